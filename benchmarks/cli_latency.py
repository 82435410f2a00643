"""How fast the CLI answers: ``automl --help``, ``automl validate`` of a good spec, and the refusals of bad input.

    python benchmarks/cli_latency.py [--runs 5]

Each command runs ``--runs`` times as a fresh process (the ``automl`` script next to this Python), one after the
other, in a temporary folder holding the specs and files below; the table gives the median, min and max wall
time from starting the process to its exit, and the exit status. DESIGN.md section 7: ``automl validate`` and
``automl --help`` under 1 s, and a bad spec or missing data file refused in under 1 s. Run it on a quiet machine:
on a busy one every figure grows alike.

The commands:
- ``--help``;
- ``validate search_spaces/digits_mlp.yaml`` (a copy): the resolved spec is printed, exit 0;
- a bad field (``parameters.lr.low: 0`` with ``log: true``): refused when the spec loads;
- a missing data file, a missing target column in a CSV and in a Parquet file, a trainer module next to the spec
  that imports a package that is not installed: refused by the preflight checks (automl/preflight.py), which
  read the file's header (the csv module; pyarrow's footer reader for Parquet) and parse the module (``ast``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("automl")
AUTOML = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "automl.cli"]
BUDGET_S = 1.0
SPEC = ("trainer: {trainer}\nmetric: val_accuracy\n{data}parameters:\n"
        "  lr: {{type: float, low: {low}, high: 0.1, log: true}}\n")


def spec(trainer: str = "mlp", data: str = "", low: str = "1.0e-4") -> str:
    return SPEC.format(trainer=trainer, data=f"data: {data}\n" if data else "", low=low)


def prepare(folder: Path) -> list[tuple[str, list[str], int]]:
    """Write the specs and files; return (label, arguments, expected exit status) per command."""
    import pandas as pd

    shutil.copy(ROOT / "search_spaces" / "digits_mlp.yaml", folder / "digits_mlp.yaml")
    frame = pd.DataFrame({"a": range(100), "b": [i * 0.5 for i in range(100)], "y": ["p", "q"] * 50})
    frame.to_csv(folder / "d.csv", index=False)
    frame.to_parquet(folder / "d.parquet")
    (folder / "my_trainer.py").write_text("import automl_no_such_package\n\ndef train(params, data, report):\n"
                                          "    return None\n")
    files = {
        "bad_field.yaml": spec(low="0.0"),
        "missing_data.yaml": spec(data="{source: nope.csv, target: y}"),
        "missing_target_csv.yaml": spec(data="{source: d.csv, target: label}"),
        "missing_target_parquet.yaml": spec(data="{source: d.parquet, target: label}"),
        "trainer_missing_package.yaml": spec(trainer="'my_trainer:train'"),
        "good_csv.yaml": spec(data="{source: d.csv, target: y}"),
        "good_parquet.yaml": spec(data="{source: d.parquet, target: y}"),
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return [
        ("automl --help", ["--help"], 0),
        ("validate digits_mlp.yaml", ["validate", "digits_mlp.yaml"], 0),
        ("validate, CSV data (header read)", ["validate", "good_csv.yaml"], 0),
        ("validate, Parquet data (footer read)", ["validate", "good_parquet.yaml"], 0),
        ("refused: bad field (parameters.lr.low)", ["validate", "bad_field.yaml"], 2),
        ("refused: missing data file", ["validate", "missing_data.yaml"], 2),
        ("refused: missing target, CSV", ["validate", "missing_target_csv.yaml"], 2),
        ("refused: missing target, Parquet", ["validate", "missing_target_parquet.yaml"], 2),
        ("refused: trainer imports a missing package", ["validate", "trainer_missing_package.yaml"], 2),
    ]


def time_command(args: list[str], cwd: Path, runs: int) -> tuple[list[float], set[int]]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    seconds, codes = [], set()
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([*AUTOML, *args], cwd=cwd, env=env, capture_output=True, check=False, timeout=120)
        seconds.append(time.perf_counter() - start)
        codes.add(proc.returncode)
    return seconds, codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default 5)")
    args = parser.parse_args(argv)
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="automl-cli-latency-") as tmp:
        folder = Path(tmp)
        for label, command, expected in prepare(folder):
            seconds, codes = time_command(command, folder, args.runs)
            median = statistics.median(seconds)
            status = "/".join(str(c) for c in sorted(codes))
            ok = "yes" if codes == {expected} and median < BUDGET_S else "NO"
            rows.append((label, median, min(seconds), max(seconds), status, ok))
            print(f"  {label:45s} median {median:.3f} s", file=sys.stderr, flush=True)
    print(f"| command | median s | min s | max s | exit | under {BUDGET_S:g} s, expected exit |")
    print("|---|---:|---:|---:|---:|---|")
    for label, median, low, high, status, ok in rows:
        print(f"| {label} | {median:.3f} | {low:.3f} | {high:.3f} | {status} | {ok} |")
    machine = platform.processor() or platform.machine()
    print(f"\n{args.runs} runs per command, each a fresh process; {os.cpu_count()} cores ({machine}), Python "
          f"{platform.python_version()}; 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
          "after (more than the cores: a busy machine, figures inflated).")
    return 0 if all(row[-1] == "yes" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
