"""Preflight (automl/preflight.py): a spec's data and trainer checked without loading the data or running code.

The data checks must agree with ``automl.data``: every file they refuse, loading refuses with the same line, and
every file they accept loads. The trainer checks read the module's source (``ast``): they refuse what importing
it would refuse and never execute it. The CLI side (``automl validate``, in a subprocess) is in
test_cli_validate.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automl.data import prepare
from automl.errors import DataError, TrainerError
from automl.preflight import check_data, check_inputs, check_trainer, find_module
from automl.spec import DataSpec, load_spec
from automl.trainer import registered_trainers, resolve_trainer

ROOT = Path(__file__).resolve().parents[1]
MISSING_PACKAGE = "automl_no_such_package_xyz"


def frame(n: int = 20, **columns: list[object]) -> pd.DataFrame:
    """``n`` rows of two features and a two-class target ``y``, plus any ``columns`` given (lists of n)."""
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(size=n), "b": rng.normal(size=n), "y": ["p", "q"] * (n // 2)}
    return pd.DataFrame({**base, **columns})


# --------------------------------------------------------------------------------------------- data

# name -> (files to write, data.source, data.target, data.task); a file's content is bytes or a DataFrame.
DATA_CASES: dict[str, tuple[dict[str, object], str, str | None, str]] = {
    "missing-file": ({}, "nope.csv", "y", "auto"),
    "missing-file-in-folder": ({}, "sub/nope.parquet", "y", "auto"),
    "unknown-suffix": ({"d.txt": b"a,y\n1,2\n"}, "d.txt", "y", "auto"),
    "empty-file": ({"d.csv": b""}, "d.csv", "y", "auto"),
    "blank-lines-only": ({"d.csv": b"\n\n"}, "d.csv", "y", "auto"),
    "header-only": ({"d.csv": b"a,b,y\n"}, "d.csv", "y", "auto"),
    "csv-missing-target": ({"d.csv": frame()}, "d.csv", "label", "auto"),
    "csv-no-target": ({"d.csv": frame()}, "d.csv", None, "auto"),
    "csv-target-only": ({"d.csv": frame()[["y"]]}, "d.csv", "y", "auto"),
    "csv-repeated-names": ({"d.csv": b"a,a,y\n1,2,p\n3,4,q\n"}, "d.csv", "a.2", "auto"),
    "csv-unnamed-column": ({"d.csv": b"a,,y\n1,2,p\n3,4,q\n"}, "d.csv", "b", "auto"),
    "csv-not-utf8": ({"d.csv": b"caf\xe9,y\n1,p\n2,q\n"}, "d.csv", "z", "auto"),
    "parquet-missing-target": ({"d.parquet": frame()}, "d.parquet", "label", "auto"),
    "parquet-index-is-not-a-column": ({"d.parquet": frame().set_index("a")}, "d.parquet", "a", "auto"),
    "parquet-no-rows": ({"d.parquet": frame().iloc[:0]}, "d.parquet", "y", "auto"),
    "parquet-not-parquet": ({"d.parquet": b"a,y\n1,p\n"}, "d.parquet", "y", "auto"),
    "image-folder-one-class": ({"imgs/cat/1.png": "image"}, "imgs", "label", "auto"),
    "image-folder-regression": ({"imgs/cat/1.png": "image", "imgs/dog/1.png": "image"}, "imgs", None,
                                "regression"),
    "sklearn-unknown": ({}, "sklearn:mnist", None, "auto"),
}
# Cases that load: preflight must accept them too (with the pandas rules for odd headers).
GOOD_DATA: dict[str, tuple[dict[str, object], str, str | None, str]] = {
    "csv": ({"d.csv": frame()}, "d.csv", "y", "auto"),
    "csv-absolute-path": ({"d.csv": frame()}, "{root}/d.csv", "y", "auto"),
    "csv-in-subfolder": ({"data/d.csv": frame()}, "data/d.csv", "y", "auto"),
    "csv-byte-order-mark": ({"d.csv": b"\xef\xbb\xbfy,a\np,1\nq,2\np,3\nq,4\np,5\nq,6\n"}, "d.csv", "y",
                            "auto"),
    "csv-quoted-name-with-comma": ({"d.csv": b'"a,b",y\n1,p\n2,q\n3,p\n4,q\n5,p\n6,q\n'}, "d.csv", "y", "auto"),
    "csv-blank-line-before-header": ({"d.csv": b"\na,y\n1,p\n2,q\n3,p\n4,q\n5,p\n6,q\n"}, "d.csv", "y", "auto"),
    "csv-repeated-names": ({"d.csv": b"a,a,y\n" + b"1,2,p\n3,4,q\n" * 5}, "d.csv", "a.1", "auto"),
    "csv-crlf": ({"d.csv": b"a,y\r\n1,p\r\n2,q\r\n3,p\r\n4,q\r\n5,p\r\n6,q\r\n"}, "d.csv", "y", "auto"),
    "parquet": ({"d.parquet": frame()}, "d.parquet", "y", "auto"),
    "pq-with-named-index": ({"d.pq": frame().set_index("a")}, "d.pq", "y", "auto"),
    "image-folder": ({f"imgs/{c}/{i}.png": "image" for c in ("cat", "dog") for i in range(4)}, "imgs", None,
                     "auto"),
    "sklearn": ({}, "sklearn:iris", None, "auto"),
}


def write_files(root: Path, files: dict[str, object]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, pd.DataFrame):
            if path.suffix == ".csv":
                content.to_csv(path, index=False)
            else:
                content.to_parquet(path)
        elif content == "image":
            Image.fromarray(np.full((4, 4), 128, dtype=np.uint8)).save(path)
        else:
            assert isinstance(content, bytes)
            path.write_bytes(content)


def make_case(root: Path, case: tuple[dict[str, object], str, str | None, str]) -> DataSpec:
    files, source, target, task = case
    write_files(root, files)
    return DataSpec.model_validate({"source": source.format(root=root), "target": target, "task": task})


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_data_is_refused_with_the_line_loading_gives(tmp_path: Path, name: str) -> None:
    spec = make_case(tmp_path, DATA_CASES[name])
    with pytest.raises(DataError) as checked:
        check_data(spec, tmp_path)
    with pytest.raises(DataError) as loaded:
        prepare(spec, base_dir=tmp_path)
    line, loading_line = str(checked.value), str(loaded.value)
    if name == "parquet-not-parquet":  # pyarrow's message names the file when pandas reads it, not the footer
        head = "data.source: cannot read d.parquet as PARQUET: "
        assert line.startswith(head)
        assert loading_line.startswith(head)
        assert loading_line.endswith(line.removeprefix(head))
    else:
        assert line == loading_line
    assert line.startswith(("data.source: ", "data.target: ", "data.task: "))


@pytest.mark.parametrize("name", sorted(GOOD_DATA))
def test_data_that_loads_is_accepted(tmp_path: Path, name: str) -> None:
    spec = make_case(tmp_path, GOOD_DATA[name])
    assert check_data(spec, tmp_path) == []
    prepare(spec, base_dir=tmp_path)  # and it does load


def test_missing_target_lists_the_columns_like_loading(tmp_path: Path) -> None:
    spec = make_case(tmp_path, DATA_CASES["csv-missing-target"])
    with pytest.raises(DataError, match=r"^data.target: column 'label' not found in d.csv; use one of: a, b, y$"):
        check_data(spec, tmp_path)


def test_a_bundled_dataset_is_not_loaded_and_an_unusual_target_is_a_note(tmp_path: Path) -> None:
    spec = DataSpec.model_validate({"source": "sklearn:digits", "target": "pixel_0_0"})
    assert check_data(spec, tmp_path) == ["data.target: 'pixel_0_0' is checked when sklearn:digits loads"]


# --------------------------------------------------------------------------------------------- trainer


def check(tmp_path: Path, trainer: str, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return check_trainer(resolve_trainer(trainer, tmp_path))


TRAIN = "def train(params, data, report):\n    return None\n"
BAD_TRAINERS: dict[str, tuple[str, dict[str, str], str]] = {
    "syntax-error": ("my:train", {"my.py": "import os\n\ndef train(params, data, report)\n    pass\n"},
                     "trainer 'my:train': syntax error in my.py, line 3: expected ':'"),
    "missing-package": ("my:train", {"my.py": f"import os\nimport {MISSING_PACKAGE}.sub as m\n{TRAIN}"},
                        f"trainer 'my:train': my.py imports '{MISSING_PACKAGE}' (line 2), which is not installed"),
    "missing-package-from": ("my:train", {"my.py": f"from {MISSING_PACKAGE} import thing\n{TRAIN}"},
                             f"my.py imports '{MISSING_PACKAGE}' (line 1)"),
    "missing-package-in-try-finally": (
        "my:train", {"my.py": f"try:\n    import {MISSING_PACKAGE}\nfinally:\n    pass\n{TRAIN}"},
        f"imports '{MISSING_PACKAGE}' (line 2)"),
    "missing-function": ("my:train", {"my.py": "def trian(params, data, report):\n    pass\n"},
                         "trainer 'my:train': module 'my' has no attribute 'train'; did you mean 'trian'?"),
    "function-only-nested": ("my:train", {"my.py": f"def outer():\n    {TRAIN.replace(chr(10), chr(10) + '    ')}\n"},
                             "module 'my' has no attribute 'train'"),
    "class-attribute-is-not-module-attribute": (
        "my:fit", {"my.py": "class T:\n    def fit(self, params, data, report):\n        pass\n"},
        "module 'my' has no attribute 'fit'"),
    "annotation-without-value": ("my:train", {"my.py": "from typing import Any\ntrain: Any\n"},
                                 "module 'my' has no attribute 'train'"),
    "package-init-syntax-error": ("pkg.mod:train", {"pkg/__init__.py": "x = (\n", "pkg/mod.py": TRAIN},
                                  "syntax error in pkg/__init__.py"),
    "package-init-missing-package": ("pkg.mod:train", {"pkg/__init__.py": f"import {MISSING_PACKAGE}\n",
                                                       "pkg/mod.py": TRAIN},
                                     f"pkg/__init__.py imports '{MISSING_PACKAGE}'"),
    "missing-package-in-class-body": ("my:T", {"my.py": f"class T:\n    import {MISSING_PACKAGE}\n"},
                                      f"my.py imports '{MISSING_PACKAGE}' (line 2)"),
    "null-bytes": ("my:train", {"my.py": "x = 1\x00\n" + TRAIN}, "trainer 'my:train': syntax error in my.py"),
    "installed-package-missing-module": ("json.no_such_module:train", {},
                                         "trainer: module 'json.no_such_module' not found next to the spec"),
}


@pytest.mark.parametrize("name", sorted(BAD_TRAINERS))
def test_bad_trainer_is_refused_without_running_it(tmp_path: Path, name: str) -> None:
    trainer, files, message = BAD_TRAINERS[name]
    with pytest.raises(TrainerError) as info:
        check(tmp_path, trainer, files)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    if files:
        assert trainer.partition(":")[0].split(".")[0] not in sys.modules  # parsed, not imported


GOOD_TRAINERS: dict[str, tuple[str, dict[str, str]]] = {
    "function": ("my:train", {"my.py": TRAIN}),
    "class": ("my:T", {"my.py": "import numpy as np\n\nclass T:\n    def fit(self, p, d, r):\n        pass\n"}),
    "async-def": ("my:train", {"my.py": "async def train(p, d, r):\n    pass\n"}),
    "assigned": ("my:train", {"my.py": "def _t(p, d, r):\n    pass\ntrain = _t\n"}),
    "unpacked": ("my:train", {"my.py": "train, other = print, print\n"}),
    "walrus": ("my:train", {"my.py": "if (train := print):\n    pass\n"}),
    "imported-as": ("my:train", {"my.py": "from helpers import fit as train\n", "helpers.py": "def fit(): pass\n"}),
    "imported-module": ("my:os", {"my.py": "import os\n"}),
    "global-in-function": ("my:train", {"my.py": "def _setup():\n    global train\n    train = print\n_setup()\n"}),
    "defined-in-a-branch": ("my:train", {"my.py": f"import sys\nif sys.platform:\n    {TRAIN.splitlines()[0]}\n"
                                                  "        pass\n"}),
    "guarded-imports": ("my:train", {"my.py": (
        f"try:\n    import {MISSING_PACKAGE}\nexcept ImportError:\n    {MISSING_PACKAGE} = None\n"
        f"try:\n    from {MISSING_PACKAGE} import x\nexcept (ValueError, ModuleNotFoundError):\n    x = None\n"
        f"try:\n    import {MISSING_PACKAGE}\nexcept Exception:\n    pass\n"
        "from typing import TYPE_CHECKING\n"
        f"if TYPE_CHECKING:\n    import {MISSING_PACKAGE}\n"
        f"if __name__ == '__main__':\n    import {MISSING_PACKAGE}\n"
        f"def train(p, d, r):\n    import {MISSING_PACKAGE}\n"
        f"with open(__file__):\n    import {MISSING_PACKAGE}\n"
    )}),
    "relative-import-in-package": ("pkg.mod:train", {"pkg/__init__.py": "", "pkg/helpers.py": "",
                                                     "pkg/mod.py": f"from . import helpers\n{TRAIN}"}),
    "namespace-package": ("ns.mod:train", {"ns/mod.py": TRAIN}),
    "package-as-module": ("pkg:train", {"pkg/__init__.py": "from pkg.impl import train\n", "pkg/impl.py": TRAIN}),
    "sibling-module-import": ("my:train", {"my.py": f"import helpers\nimport sub.deep\n{TRAIN}",
                                           "helpers.py": "", "sub/deep.py": ""}),
    "future-and-stdlib": ("my:train", {"my.py": f"from __future__ import annotations\nimport sys, os.path\n{TRAIN}"}),
    "automl-contract": ("my:T", {"my.py": "from automl.trainer import Trainer\n\nclass T(Trainer):\n    pass\n"}),
    "coding-declaration": ("my:train", {"my.py": f"# -*- coding: latin-1 -*-\n# caf\u00e9\n{TRAIN}"}),
    "installed-module": ("json:dumps", {}),
}


def test_imports_can_be_left_to_the_machines_that_run_the_trainer(tmp_path: Path) -> None:
    files = {"my.py": f"import {MISSING_PACKAGE}\n{TRAIN}"}
    with pytest.raises(TrainerError, match="which is not installed"):
        check(tmp_path, "my:train", files)
    assert check_trainer(resolve_trainer("my:train", tmp_path), imports=False) == []
    with pytest.raises(TrainerError, match="has no attribute 'fit'"):  # the rest is still checked
        check_trainer(resolve_trainer("my:fit", tmp_path), imports=False)


@pytest.mark.parametrize("name", sorted(GOOD_TRAINERS))
def test_trainer_that_imports_is_accepted(tmp_path: Path, name: str) -> None:
    trainer, files = GOOD_TRAINERS[name]
    assert check(tmp_path, trainer, files) == []


@pytest.mark.parametrize("source", ["from helpers import *\n", "def __getattr__(name):\n    return print\n",
                                    "globals()['train'] = print\n"])
def test_names_bound_at_run_time_are_left_to_the_import_with_a_note(tmp_path: Path, source: str) -> None:
    notes = check(tmp_path, "my:train", {"my.py": source, "helpers.py": TRAIN})
    assert len(notes) == 1
    assert notes[0].startswith("trainer 'my:train': my.py defines names at run time (")
    assert "'train' is checked when the sweep starts" in notes[0]


def test_the_trainer_module_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    source = f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n{TRAIN}"
    assert check(tmp_path, "marked:train", {"marked.py": source, "pkg/__init__.py": source, "pkg/m.py": source}) == []
    assert check_trainer(resolve_trainer("pkg.m:train", tmp_path)) == []
    assert not marker.exists()
    assert "marked" not in sys.modules
    assert "pkg" not in sys.modules


def test_the_test_and_benchmark_trainers_pass() -> None:
    for folder, module in [(ROOT / "tests" / "assets", "toy_trainers"), (ROOT / "tests" / "assets", "cond_trainers"),
                           (ROOT / "benchmarks", "objectives")]:
        text = (folder / f"{module}.py").read_text()
        names = [line[4:].partition("(")[0] for line in text.splitlines() if line.startswith("def ")]
        assert names
        for name in names:
            assert check_trainer(resolve_trainer(f"{module}:{name}", folder)) == [], name


def test_every_registered_trainer_is_found_without_importing_it() -> None:
    before = set(sys.modules)
    for name in registered_trainers():
        assert check_trainer(resolve_trainer(name)) == []
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("trainers", "torch", "sklearn")}


def test_a_registered_trainer_whose_module_is_gone_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import automl.trainer

    monkeypatch.setattr(automl.trainer, "registered_trainers",
                        lambda: {"ghost": f"{MISSING_PACKAGE}.trainers:Ghost", "half": "trainers.no_such:T"})
    with pytest.raises(TrainerError, match=(rf"^trainer 'ghost': module '{MISSING_PACKAGE}.trainers' is not "
                                            rf"installed \(the trainer is registered as {MISSING_PACKAGE}.trainers:"
                                            r"Ghost\); reinstall the package that provides it$")):
        check_trainer(resolve_trainer("ghost"))
    with pytest.raises(TrainerError, match=r"^trainer 'half': module 'trainers.no_such' is not installed"):
        check_trainer(resolve_trainer("half"))


def test_a_module_function_without_a_spec_folder_must_be_installed() -> None:
    assert check_trainer(resolve_trainer("json:dumps")) == []
    with pytest.raises(TrainerError, match=r"^trainer: module 'json\.nope' is not installed$"):
        check_trainer(resolve_trainer("json.nope:dumps"))


def test_find_module_walks_packages_without_importing_them() -> None:
    for name in ("trainers.sklearn_models", "json.decoder", "os"):
        spec = find_module(name)
        assert spec is not None
        assert spec.name == name
    assert find_module("trainers.no_such_module") is None
    assert find_module("os.no_such") is None  # os is a module, not a package
    assert find_module(MISSING_PACKAGE) is None


# --------------------------------------------------------------------------------------------- the whole spec


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_ready_specs_pass(path: Path) -> None:
    assert check_inputs(load_spec(path), path.parent) == []


def test_check_inputs_checks_the_trainer_then_the_data(tmp_path: Path) -> None:
    from automl.spec import spec_from_dict

    raw = {"trainer": "my:train", "metric": "val_accuracy", "data": {"source": "nope.csv", "target": "y"},
           "parameters": {"x": {"type": "int", "low": 1, "high": 2}}}
    with pytest.raises(TrainerError, match="module 'my' not found next to the spec"):
        check_inputs(spec_from_dict(raw), tmp_path)
    (tmp_path / "my.py").write_text(TRAIN)
    with pytest.raises(DataError, match=r"^data\.source: file not found: .*nope\.csv; check the path"):
        check_inputs(spec_from_dict(raw), tmp_path)
    frame().to_csv(tmp_path / "nope.csv", index=False)
    assert check_inputs(spec_from_dict(raw), tmp_path) == []
    assert check_inputs(spec_from_dict({**raw, "data": None}), tmp_path) == []
