"""Preflight: the checks of a resolved spec's inputs that need no Ray, no MLflow, no torch, and run no user code.

``automl validate`` runs them once the spec has loaded, and a sweep before it starts anything, so that a missing
data file, a target column the file lacks or a trainer that cannot be imported is refused in one line, in well
under a second, instead of after Ray has started:

- ``data.source``: a bundled dataset's name; a file's existence, suffix and header (the first lines of a CSV,
  the footer of a Parquet file: no table is read); an image folder's class subfolders (no image is read);
- ``data.target``: given for a table, and one of its columns;
- ``trainer``: a registered trainer's module is installed (found, not imported); a ``module:function`` next to
  the spec is parsed with ``ast``, never executed: it must be valid Python, define the function or class at
  its top level, and every module it imports unconditionally must be installed or next to the spec.

What needs the data's values (a single class, a numeric target for regression) or the trainer's code running (a
class without ``fit``, an import that fails for another reason) is still checked when the sweep loads them. The
checks refuse only what loading would refuse: where they cannot tell, they accept, and may say so in a note.
"""

from __future__ import annotations

import ast
import csv
import difflib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import TYPE_CHECKING

from automl.data import check_bundled, check_exists, check_target, class_folders, source_path, table_kind
from automl.errors import DataError, TrainerError
from automl.trainer import TrainerRef, resolve_trainer

if TYPE_CHECKING:
    from automl.spec import DataSpec, Spec

__all__ = ["check_data", "check_inputs", "check_trainer"]

_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
# Calls at a module's top level through which it may bind names that a parse cannot see.
_DYNAMIC_CALLS = {"globals", "setattr", "exec"}


def check_inputs(spec: Spec, base_dir: Path, *, imports: bool = True) -> list[str]:
    """Check the spec's trainer and data without running anything; return notes for the user.

    ``base_dir`` is the spec file's folder: relative data paths and ``module:function`` trainers resolve
    against it. Raises ``TrainerError`` (field ``trainer``) or ``DataError`` (``data.source``, ``data.target``,
    ``data.task``) with the one line the CLI prints. Reads only file headers and the trainer's source text.
    ``imports=False`` leaves out whether the packages the trainer imports are installed here: for trainers that
    run on machines with packages this one lacks (a Ray cluster's workers).
    """
    ref = resolve_trainer(spec.trainer, base_dir)
    notes = check_trainer(ref, imports=imports)
    if spec.method == "pbt":
        notes += check_checkpoints(ref, spec)
    if spec.data is not None:
        notes += check_data(spec.data, base_dir)
    return notes


# --------------------------------------------------------------------------------------------- data


def check_data(data: DataSpec, base_dir: Path | None) -> list[str]:
    """``data.source`` exists and is readable as what it claims to be; ``data.target`` is one of its columns.

    The messages are those ``automl.data`` gives when it loads the same source.
    """
    if data.source.startswith("sklearn:"):
        name = data.source.removeprefix("sklearn:")
        check_bundled(name)
        if data.target not in (None, "target"):  # a feature column as the target: only loading tells
            return [f"data.target: '{data.target}' is checked when {data.source} loads"]
        return []
    path = source_path(data.source, base_dir)
    check_exists(path)
    if path.is_dir():
        _check_image_folder(data, path)
        return []
    kind = table_kind(path)
    if kind == "csv":
        columns, has_rows = _csv_header(path)
    else:
        header = _parquet_header(path)
        if header is None:
            return [f"data.source: {path.name}'s columns are checked when it loads (pyarrow is not installed)"]
        columns, has_rows = header
    if not has_rows:
        raise DataError(f"data.source: {path.name} has no rows; it needs at least one row below the header")
    target = check_target(data.target, columns, path.name)
    if len(columns) == 1:
        raise DataError(f"data.source: {path.name} has no feature columns besides the target '{target}'")
    return []


def _check_image_folder(data: DataSpec, path: Path) -> None:
    """What ``automl.data`` refuses about an image folder before it reads an image."""
    if data.task == "regression":
        raise DataError("data.task: an image folder is a classification task (one subfolder per class); remove "
                        "data.task: regression")
    class_folders(path)


def _csv_header(path: Path) -> tuple[list[str], bool]:
    """The column names pandas would give the file, and whether a row follows the header.

    Read with the csv module: importing pandas takes about as long as the rest of ``automl validate``. A header
    that pandas would rename (empty or repeated names) or that the csv module cannot read is left to pandas.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # pandas drops a UTF-8 byte order mark too
            records = (row for row in csv.reader(f) if row)  # pandas skips blank lines
            header = next(records, None)
            has_rows = next(records, None) is not None
    except (csv.Error, OSError, ValueError):  # UnicodeDecodeError is a ValueError: pandas gives the message
        header, has_rows = None, False
    if header is None or len(set(header)) != len(header) or "" in header:
        return _pandas_header(path)
    return header, has_rows


def _pandas_header(path: Path) -> tuple[list[str], bool]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, nrows=1)
    except pd.errors.EmptyDataError:
        raise DataError(f"data.source: {path.name} is empty; it needs a header line and at least one row") from None
    except Exception as exc:  # pandas raises many types for unreadable files
        raise DataError(f"data.source: cannot read {path.name} as CSV: {_first_line(exc)}") from None
    return [str(c) for c in frame.columns], not frame.empty


def _parquet_header(path: Path) -> tuple[list[str], bool] | None:
    """Column names from the file's footer (pandas' stored index left out), and whether it has rows."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for files that are not Parquet
        raise DataError(f"data.source: cannot read {path.name} as PARQUET: {_first_line(exc)}") from None
    pandas_meta = schema.pandas_metadata or {}
    index = {c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)}  # a RangeIndex is a dict
    return [n for n in schema.names if n not in index], meta.num_rows > 0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------------------------- trainer


def check_trainer(ref: TrainerRef, *, imports: bool = True) -> list[str]:
    """The trainer's module can be imported, found without importing it.

    A registered trainer's module must be installed. A ``module:function`` next to the spec (and the
    ``__init__.py`` of the packages above it) is parsed, not run: valid Python, the attribute bound at top level,
    and (unless ``imports`` is false) the modules it imports unconditionally (not inside functions, ``if``
    blocks or a ``try`` that catches ``ImportError``) installed or next to the spec. A ``module:function`` that
    is installed must be findable.
    """
    module_name, _, attr = ref.target.partition(":")
    if ref.name != ref.target:  # registered by name: built in, or an installed package's entry point
        if find_module(module_name) is None:
            raise TrainerError(f"trainer '{ref.name}': module '{module_name}' is not installed (the trainer is "
                               f"registered as {ref.target}); reinstall the package that provides it")
        return []
    base = Path(ref.search_path) if ref.search_path is not None else None
    files = _local_files(module_name, base) if base is not None else []
    if base is None or not files:  # installed, not next to the spec
        if find_module(module_name, ref.search_path) is None:
            where = f"not found next to the spec ({base}) nor installed" if base is not None else "is not installed"
            raise TrainerError(f"trainer: module '{module_name}' {where}")
        return []
    missing: dict[str, bool] = {}
    scan = _Scan()
    for file in files:
        scan = _scan_file(ref.name, file, base)
        for top, line in scan.imports if imports else []:
            if top not in missing:
                missing[top] = not _importable(top, base)
            if missing[top]:
                raise TrainerError(f"trainer '{ref.name}': {_shown(file, base)} imports '{top}' (line {line}), "
                                   "which is not installed")
    if attr in scan.names:
        return []
    if scan.dynamic:
        return [f"trainer '{ref.name}': {_shown(files[-1], base)} defines names at run time ({scan.dynamic}); "
                f"'{attr}' is checked when the sweep starts"]
    close = difflib.get_close_matches(attr, sorted(scan.names), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise TrainerError(f"trainer '{ref.name}': module '{module_name}' has no attribute '{attr}'{hint}")


def check_checkpoints(ref: TrainerRef, spec: Spec) -> list[str]:
    """method: pbt needs a trainer that saves and restores checkpoints (``checkpoints = True``: automl.trainer),
    and only parameters it lets change may be ``mutable``. A registered trainer (installed code) is imported to
    read them; a ``module:function`` next to the spec is read from its source, never run."""
    from automl.space import mutable_paths
    from automl.trainer import mutable_parameters, supports_checkpoints

    fix = "use mlp or cnn, or a trainer that sets checkpoints = True (see automl.trainer)"
    module_name, _, attr = ref.target.partition(":")
    if ref.name != ref.target:
        obj = ref.load_object()
        if not supports_checkpoints(obj):
            raise TrainerError(f"trainer: '{ref.name}' cannot save and restore checkpoints, which method: pbt needs; "
                               f"{fix}")
        allowed = mutable_parameters(obj)
        for path in mutable_paths(spec.parameters):
            name = path.rsplit(".", 1)[-1]
            if allowed is not None and name not in allowed:
                raise TrainerError(f"{path}.mutable: '{name}' cannot change while trainer '{ref.name}' trains (it "
                                   f"shapes the model or its optimizer); only {', '.join(sorted(allowed))} may "
                                   "be mutable")
        return []
    base = Path(ref.search_path) if ref.search_path is not None else None
    files = _local_files(module_name, base) if base is not None else []
    if not files:
        return [f"trainer '{ref.name}': whether it saves checkpoints (method: pbt) is checked when the sweep starts"]
    tree = ast.parse(files[-1].read_bytes())
    if not _declares_checkpoints(tree, attr):
        raise TrainerError(f"trainer: '{ref.name}' does not declare checkpoints = True, which method: pbt needs; "
                           f"{fix}")
    return []


def _declares_checkpoints(tree: ast.Module, attr: str) -> bool:
    """``checkpoints = True`` in class ``attr``'s body, or ``attr.checkpoints = True`` at the module's top level."""
    def is_true(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value is True

    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            for item in node.body:
                targets = item.targets if isinstance(item, ast.Assign) else \
                    [item.target] if isinstance(item, ast.AnnAssign) else []
                value = getattr(item, "value", None)
                if value is not None and is_true(value) and any(
                        isinstance(t, ast.Name) and t.id == "checkpoints" for t in targets):
                    return True
        if isinstance(node, ast.Assign) and is_true(node.value) and any(
                isinstance(t, ast.Attribute) and t.attr == "checkpoints" and isinstance(t.value, ast.Name)
                and t.value.id == attr for t in node.targets):
            return True
    return False


def find_module(name: str, search_path: str | None = None) -> ModuleSpec | None:
    """Where ``import name`` would find the module (``search_path`` first), without running any of its code.

    ``importlib.util.find_spec("a.b")`` imports ``a`` to find ``b``; this walks the packages' folders instead.
    """
    top, *rest = name.split(".")
    spec = _find_top(top, search_path)
    for i in range(len(rest)):
        locations = spec.submodule_search_locations if spec is not None else None
        if not locations:
            return None
        spec = PathFinder.find_spec(".".join([top, *rest[: i + 1]]), list(locations))
    return spec


def _find_top(name: str, search_path: str | None) -> ModuleSpec | None:
    if search_path is not None:
        spec = PathFinder.find_spec(name, [search_path])
        if spec is not None:
            return spec
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # ValueError: imported already, with no __spec__ (e.g. __main__)
        return ModuleSpec(name, None) if name in sys.modules else None


def _importable(top: str, base: Path) -> bool:
    return top in sys.modules or top in sys.builtin_module_names or _find_top(top, str(base)) is not None


def _local_files(module_name: str, base: Path) -> list[Path]:
    """The files ``import module_name`` runs from ``base``, in order: packages' ``__init__.py``, then the module;
    empty when the module is not there (as ``resolve_trainer`` decides)."""
    parts = module_name.split(".")
    candidate = Path(base, *parts)
    if candidate.with_suffix(".py").is_file():
        module = candidate.with_suffix(".py")
    elif (candidate / "__init__.py").is_file():
        module = candidate / "__init__.py"
    else:
        return []
    parents = [Path(base, *parts[:i], "__init__.py") for i in range(1, len(parts))]
    return [p for p in parents if p.is_file()] + [module]


def _shown(file: Path, base: Path) -> str:
    try:
        return str(file.relative_to(base))
    except ValueError:
        return str(file)


# --------------------------------------------------------------------------------------------- source scan


@dataclass
class _Scan:
    """What a module's source says about it, read without running it."""

    names: set[str] = field(default_factory=set)  # bound at top level (in any branch)
    imports: list[tuple[str, int]] = field(default_factory=list)  # (top-level package, line), unconditional
    dynamic: str | None = None  # why ``names`` may be incomplete


def _scan_file(trainer: str, file: Path, base: Path) -> _Scan:
    try:
        source = file.read_bytes()
    except OSError as exc:
        raise TrainerError(f"trainer '{trainer}': cannot read {_shown(file, base)} ({exc.strerror})") from None
    try:
        tree = ast.parse(source, filename=str(file))
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes (Python < 3.12)
        line = getattr(exc, "lineno", None)
        where = f", line {line}" if line else ""
        message = getattr(exc, "msg", None) or _first_line(exc)
        raise TrainerError(f"trainer '{trainer}': syntax error in {_shown(file, base)}{where}: {message}") from None
    scan = _Scan(imports=list(_unconditional_imports(tree.body, guarded=False)))
    names = _TopLevelNames()
    names.visit(tree)
    scan.names, scan.dynamic = names.names, names.dynamic
    return scan


def _unconditional_imports(body: list[ast.stmt], *, guarded: bool) -> Iterator[tuple[str, int]]:
    """Absolute imports that run whenever the module is imported, unless an ``except`` catches their failure.

    Class bodies run with the module. Imports in functions, ``if`` (``TYPE_CHECKING``, version checks), loops,
    ``with`` blocks and ``except``/``else`` branches may never run, or run guarded: they are left to the import.
    """
    for node in body:
        if isinstance(node, ast.Import) and not guarded:
            for alias in node.names:
                yield alias.name.partition(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and not guarded and node.level == 0 and node.module:
            yield node.module.partition(".")[0], node.lineno
        elif isinstance(node, ast.Try | ast.TryStar):
            caught = any(_catches_import_error(handler.type) for handler in node.handlers)
            yield from _unconditional_imports(node.body, guarded=guarded or caught)
            yield from _unconditional_imports(node.finalbody, guarded=guarded)
        elif isinstance(node, ast.ClassDef):
            yield from _unconditional_imports(node.body, guarded=guarded)


def _catches_import_error(kind: ast.expr | None) -> bool:
    if kind is None:  # a bare except
        return True
    if isinstance(kind, ast.Tuple):
        return any(_catches_import_error(k) for k in kind.elts)
    name = kind.id if isinstance(kind, ast.Name) else kind.attr if isinstance(kind, ast.Attribute) else ""
    return name in _IMPORT_ERRORS


class _TopLevelNames(ast.NodeVisitor):
    """Names a module binds at top level, in any branch: ``def``, ``class``, assignments, imports, loop and
    ``with`` targets, ``:=``, ``match`` captures, and ``global`` declarations in its functions."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.dynamic: str | None = None

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.names.add(node.name)
        if node.name == "__getattr__":
            self.dynamic = self.dynamic or "a module __getattr__"
        self._inner_scope(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.names.add(node.name)
        self._inner_scope(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._inner_scope(node)

    def _inner_scope(self, node: ast.AST) -> None:
        # A function's or class's own names are not the module's, except those it declares `global`.
        for sub in ast.walk(node):
            if isinstance(sub, ast.Global):
                self.names.update(sub.names)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self.names.add(node.id)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:  # `x: int` alone binds nothing
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.names.add(alias.asname or alias.name.partition(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.dynamic = self.dynamic or f"from {'.' * node.level}{node.module or ''} import *"
            else:
                self.names.add(alias.asname or alias.name)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self.names.add(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self.names.add(node.rest)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in _DYNAMIC_CALLS:
            self.dynamic = self.dynamic or f"{node.func.id}()"
        self.generic_visit(node)
