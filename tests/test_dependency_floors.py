"""Minimum versions stay above the known vulnerabilities this code can reach: a later edit of pyproject.toml cannot
lower one silently. Each floor names why it is there (README, "Security")."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# package -> (lowest version allowed, why)
FLOORS = {
    "pyarrow": ("14.0.1", "CVE-2023-47248: code execution when reading IPC or Parquet files"),
    "pillow": ("10.3", "libwebp CVE-2023-4863 and CVE-2024-28219 in image folders"),
    "skops": ("0.12", "CVE-2025-54412 and CVE-2025-54413: skops type checks bypassed on load"),
    "mlflow": ("3.5", "Host-header checks against DNS rebinding for `automl ui`"),
    "ray": ("2.52", "token authentication for the local Ray (RAY_AUTH_MODE=token)"),
    "starlette": ("1.6", "CVE-2024-47874, CVE-2025-54121, CVE-2025-62727, CVE-2026-48710 (Host header), "
                         "CVE-2026-54282/54283: `automl serve`"),
    "python-multipart": ("0.0.27", "CVE-2024-53981, CVE-2026-24486, CVE-2026-42561: dataset uploads to `automl serve`"),
}


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        found[req.name.lower()] = req
    return found


def lowest_allowed(specifier: SpecifierSet) -> Version | None:
    """The smallest version a specifier admits, from its lower bounds (None when it has none)."""
    floors = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=", ">")]
    return max(floors) if floors else None


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_each_dependency_floor_is_above_its_known_vulnerability(package: str) -> None:
    minimum, why = FLOORS[package]
    req = requirements().get(package)
    assert req is not None, f"{package} must be a declared dependency ({why})"
    floor = lowest_allowed(req.specifier)
    assert floor is not None, f"{package}: pyproject.toml sets no floor; it must be >= {minimum} ({why})"
    assert floor >= Version(minimum), f"{package}: the floor must be >= {minimum} ({why}); it is {req.specifier}"
    below = [v for v in probes_below(Version(minimum)) if req.specifier.contains(v, prereleases=True)]
    assert not below, f"{package}: {req.specifier} admits {below[0]}, below {minimum} ({why})"


def probes_below(minimum: Version) -> list[str]:
    """Versions just under ``minimum`` (its last number less one, the major's .0) and a very old one."""
    release = list(minimum.release)
    probes = ["0.0.1"]
    if release[-1] > 0:
        probes.append(".".join(map(str, [*release[:-1], release[-1] - 1])))
    if Version(f"{release[0]}.0") < minimum:
        probes.append(f"{release[0]}.0")
    return probes


def test_the_installed_versions_meet_the_floors() -> None:
    from importlib.metadata import version

    for package, (minimum, why) in FLOORS.items():
        assert Version(version(package)) >= Version(minimum), f"{package} installed below {minimum} ({why})"


def test_python_floor_lets_helper_processes_leave_the_working_directory_off_their_path() -> None:
    # `python -P` and PYTHONSAFEPATH (3.11) keep a ./mlflow.py next to a spec out of the writer and the UI.
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert lowest_allowed(SpecifierSet(project["requires-python"])) >= Version("3.11")
    assert sys.version_info >= (3, 11)
