"""Loading (pandas, Pillow) and preprocessing (scikit-learn): spec ``data`` -> the ``Dataset``(s) trainers see.

Sources: ``sklearn:<name>`` (a bundled dataset), a ``.csv`` or ``.parquet`` file, or a folder of images with
one subfolder per class. The preprocessing is fitted on the training split only, and travels with every
exported model, so that a model takes the same raw rows (original columns, missing values, unseen categories)
that the data file had.

With ``data.validation.folds: k`` the data is split into k folds (stratified for classification); each fold
is a ``Dataset`` with its own preprocessing, fitted on that fold's training part. ``PreparedData.dataset`` and
``.preprocessor`` are fold 1's: the model a k-fold trial exports is the one trained in fold 1.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automl.errors import DataError
from automl.trainer import Dataset

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.compose import ColumnTransformer

    from automl.spec import DataSpec

log = logging.getLogger(__name__)

SKLEARN_DATASETS = {
    "digits": "load_digits",
    "iris": "load_iris",
    "wine": "load_wine",
    "breast_cancer": "load_breast_cancer",
    "diabetes": "load_diabetes",
}
# Bundled datasets whose rows are images flattened in C-H-W order (their columns stay standardised).
SKLEARN_IMAGE_SHAPES = {"digits": (1, 8, 8)}
# An integer target with at most this many distinct values is taken as class labels (task: auto).
MAX_CLASSES_FOR_INTEGER_TARGET = 20
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Pillow modes with one channel: a folder of only these loads as grayscale (L), anything else as RGB.
_GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
# An image folder is held in memory as float32; past this, refuse with a hint rather than exhaust memory.
MAX_IMAGE_BYTES = 4 << 30
# One-hot encoding gives a text column at most this many columns: its most frequent values keep one each, and the
# rest, with values never seen in training, share the last one (dense features: 200k distinct values one-hot
# encoded would ask for hundreds of GiB). 30 keeps weekdays, months and most codes whole.
MAX_CATEGORIES = 30
# A value seen in fewer training rows than this shares the "rare" column too: one row teaches nothing general.
MIN_CATEGORY_ROWS = 2
# A text column with more than MAX_CATEGORIES distinct values, which are also more than this fraction of its
# rows, is an identifier or free text (a name, a ticket number, a comment): left out of the features.
ID_DISTINCT_FRACTION = 0.5
# An integer column whose values are all distinct and consecutive (1..891 in any order, none missing) is a row
# number, left out of the features, in a table of more than this many rows (in fewer, a count may be so by chance).
ROW_NUMBER_MIN_ROWS = 30
# An integer column whose name ends in one of these words (id, passenger_id, PassengerId, CustomerID, row_index; or
# pandas' 'Unnamed: 0' index column), with a distinct value in every row, is an identifier, consecutive or not.
ID_WORDS = frozenset({"id", "ids", "key", "index", "idx", "row", "rownum", "uuid"})
# A text column whose values average at least this many words, with more than MAX_CATEGORIES distinct values, is
# free text (a comment, a description): one-hot encoding would keep only its most frequent sentences.
FREE_TEXT_WORDS = 3.0
# Rows sampled to measure a text column's words (the rule reads the column's first values only).
FREE_TEXT_SAMPLE = 1000
# A refit's validation rows (prepare_all_rows): a sample of the training rows, for the trainers' reports only.
REFIT_REPORT_ROWS = 256


@dataclass
class PreparedData:
    """The dataset trainers see, and what an exported model needs to take raw rows."""

    dataset: Dataset  # fold 1's with data.validation.folds
    preprocessor: ColumnTransformer  # fitted on ``dataset``'s training rows: the one exported with the model
    columns: list[str]
    dtypes: dict[str, str]
    example: pd.DataFrame  # a few raw validation rows: the input example of the exported model
    raw_val: pd.DataFrame
    folds: list[Dataset] | None = None  # k-fold: every fold, the first being ``dataset``
    # What the preparation decided about columns, one sentence each, for the run header: "dropped 'name'
    # (ID-like: 891 distinct values in 891 rows)". ``columns`` still lists a dropped column: the exported
    # model takes the raw rows, and its preprocessor ignores that column.
    notes: list[str] = field(default_factory=list)

    @property
    def trainer_data(self) -> Dataset | list[Dataset]:
        """What a trial receives from the backend: the dataset, or the list of folds to train one by one."""
        return self.folds if self.folds else self.dataset


@dataclass
class _Table:
    """Raw features and encoded targets, before any split."""

    X: pd.DataFrame
    y: np.ndarray
    task: str
    classes: list[Any]
    target: str
    image_shape: tuple[int, int, int] | None = None
    passthrough: bool = False  # image folders: pixels are already in [0, 1], nothing to learn from them


# --------------------------------------------------------------------------------------------- loading


def source_path(source: str, base_dir: Path | None = None) -> Path:
    """A file or folder source, resolved against ``base_dir`` (the spec file's directory) when relative."""
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def load_frame(source: str, base_dir: Path | None = None) -> tuple[pd.DataFrame, str | None]:
    """Read ``sklearn:<name>``, a ``.csv`` or a ``.parquet`` file; return the frame and its own target name."""
    import pandas as pd

    if source.startswith("sklearn:"):
        name = source.removeprefix("sklearn:")
        check_bundled(name)
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, SKLEARN_DATASETS[name])(as_frame=True)
        return bunch.frame, "target"
    path = source_path(source, base_dir)
    check_exists(path)
    if path.is_dir():  # prepare() reads image folders before it gets here; other callers take tables only
        raise DataError(f"data.source: {path.name} is a folder, not a CSV or Parquet file")
    kind = table_kind(path)
    try:
        frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"data.source: {path.name} is empty; it needs a header line and at least one row") from None
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        raise DataError(f"data.source: cannot read {path.name} as {kind.upper()}: {_first_line(exc)}") from None
    if frame.empty:
        raise DataError(f"data.source: {path.name} has no rows; it needs at least one row below the header")
    return frame, None


def check_bundled(name: str) -> None:
    if name not in SKLEARN_DATASETS:
        raise DataError(f"data.source: unknown bundled dataset '{name}'; use one of {', '.join(SKLEARN_DATASETS)}")


def check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data.source: file not found: {path}; check the path (a relative path is read from the "
                        "spec file's folder)")


def table_kind(path: Path) -> str:
    """``csv`` or ``parquet`` for a table file that is not empty; ``DataError`` (one line) otherwise."""
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"data.source: {path.name} is neither CSV nor Parquet; use a .csv, .parquet or .pq file, "
                        "a folder of images (one subfolder per class) or sklearn:<name>")
    if path.stat().st_size == 0:
        raise DataError(f"data.source: {path.name} is empty; it needs a header line and at least one row")
    return kind


def check_target(target: str | None, columns: Any, where: str) -> str:
    """The target column, named and present in ``columns``; ``DataError`` (one line) otherwise."""
    if target is None:
        raise DataError(f"data.target: name the column to predict (data.target: <column>); {where} has: "
                        f"{_column_list(columns)}")
    if target not in columns:
        raise DataError(f"data.target: column '{target}' not found in {where}; use one of: {_column_list(columns)}")
    return target


def class_folders(path: Path) -> list[Path]:
    """An image folder's class subfolders, at least two (``DataError`` otherwise); no image is read."""
    class_dirs = sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: d.name)
    if len(class_dirs) < 2:
        found = f" ({class_dirs[0].name})" if class_dirs else ""
        raise DataError(f"data.source: image folder {path.name} has {len(class_dirs)} class subfolder{found}; "
                        "it needs one subfolder of images per class, at least two")
    return class_dirs


def load_image_folder(path: Path) -> tuple[np.ndarray, list[str], tuple[int, int, int]]:
    """A folder with one subfolder per class -> (pixels, labels, (C, H, W)).

    Images are converted to one mode (``L`` if every image is grayscale, else ``RGB``) and one size (the most
    common; others are resized, bilinear), scaled to [0, 1] and flattened in C-H-W order as float32 rows.
    Files that are not images (by suffix) and hidden files are ignored; unreadable images are skipped with a
    warning. Subfolders of a class folder belong to that class.
    """
    from PIL import Image, UnidentifiedImageError

    unreadable = (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)
    class_dirs = class_folders(path)
    # Pass 1 reads headers only (Pillow decodes lazily): the common mode and size, before any pixel is decoded.
    files: list[tuple[Path, str]] = []
    sizes: Counter[tuple[int, int]] = Counter()
    gray = True
    skipped = 0
    for d in class_dirs:
        count = 0
        for file in _image_files(d):
            try:
                with Image.open(file) as im:
                    size, mode = im.size, im.mode
            except unreadable:
                skipped += 1
                continue
            files.append((file, d.name))
            sizes[size] += 1
            gray = gray and mode in _GRAY_MODES
            count += 1
        if count == 0:
            raise _no_images(d)
    (width, height), _ = sizes.most_common(1)[0]
    mode = "L" if gray else "RGB"
    shape = (1 if gray else 3, height, width)
    n_pixels = shape[0] * height * width
    if len(files) * n_pixels * 4 > MAX_IMAGE_BYTES:
        raise DataError(f"data.source: {len(files)} images of {width}x{height} would take "
                        f"{len(files) * n_pixels * 4 / 2**30:.1f} GiB in memory; resize them to a smaller size "
                        "beforehand")
    # Pass 2 decodes straight into one preallocated array.
    X = np.empty((len(files), n_pixels), dtype=np.float32)
    keep = np.ones(len(files), dtype=bool)
    for i, (file, _) in enumerate(files):
        try:
            with Image.open(file) as im:
                X[i] = _pixels(im, mode, (width, height)).ravel()
        except unreadable:
            keep[i] = False
            skipped += 1
    labels = [label for (_, label), ok in zip(files, keep, strict=True) if ok]
    for d in class_dirs:
        if d.name not in labels:
            raise _no_images(d)
    if skipped:
        log.warning("data.source: skipped %d unreadable image file(s) in %s", skipped, path)
    resized = sum(n for size, n in sizes.items() if size != (width, height))
    if resized:
        log.warning("data.source: resized %d image(s) to the most common size, %dx%d", resized, width, height)
    return (X if keep.all() else X[keep]), labels, shape


def _image_files(folder: Path) -> Iterator[Path]:
    for file in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in file.relative_to(folder).parts)  # .ipynb_checkpoints/...
        if file.suffix.lower() in IMAGE_SUFFIXES and not hidden and file.is_file():
            yield file


def _no_images(folder: Path) -> DataError:
    return DataError(f"data.source: class folder {folder.parent.name}/{folder.name} has no readable images "
                     f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")


def _pixels(im: Any, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One Pillow image -> (C, H, W) float32 in [0, 1]."""
    from PIL import Image

    scale = 255.0
    if mode == "L" and im.mode.startswith("I;16"):
        im = Image.fromarray(np.asarray(im, dtype=np.float32) / 65535.0)  # keep 16-bit precision (mode F)
        scale = 1.0
    else:
        im = im.convert(mode)
    if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / scale
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------- the task


def infer_task(target: pd.Series) -> str:
    """The rule of ``data.task: auto``: classification for text, boolean and categorical targets, and for
    whole-number targets (``3`` or ``3.0``) with at most ``MAX_CLASSES_FOR_INTEGER_TARGET`` distinct values;
    regression otherwise."""
    import pandas as pd

    if not (pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target)):
        return "classification"
    values = target.dropna()
    if pd.api.types.is_integer_dtype(values) or bool((values == values.round()).all()):
        if values.nunique() <= MAX_CLASSES_FOR_INTEGER_TARGET:
            return "classification"
    return "regression"


def _encode_classes(y_raw: pd.Series, target: str) -> tuple[np.ndarray, list[Any]]:
    classes = sorted(y_raw.unique().tolist(), key=lambda v: (str(type(v)), v))
    if len(classes) < 2:
        raise DataError(f"data.target: '{target}' has a single class ({classes[0]!r}); classification needs at "
                        "least two: check the target column, or set data.task: regression for a number")
    index = {c: i for i, c in enumerate(classes)}
    return y_raw.map(index).to_numpy(dtype=np.int64), classes


def _load_table(spec: DataSpec, base_dir: Path | None) -> _Table:
    import pandas as pd

    path = None if spec.source.startswith("sklearn:") else source_path(spec.source, base_dir)
    if path is not None and path.is_dir():
        return _image_table(spec, path)
    frame, own_target = load_frame(spec.source, base_dir)
    where = path.name if path is not None else spec.source
    target = check_target(spec.target or own_target, frame.columns, where)
    frame = frame[frame[target].notna()]
    if frame.empty:
        raise DataError(f"data.target: column '{target}' has no values in {where}; pick the column to predict")
    y_raw = frame[target]
    X_raw = frame.drop(columns=[target])
    if X_raw.shape[1] == 0:
        raise DataError(f"data.source: {where} has no feature columns besides the target '{target}'")
    task = infer_task(y_raw) if spec.task == "auto" else spec.task
    classes: list[Any] = []
    if task == "classification":
        y, classes = _encode_classes(y_raw, str(target))
    else:
        if not pd.api.types.is_numeric_dtype(y_raw) or pd.api.types.is_bool_dtype(y_raw):
            raise DataError(f"data.target: regression needs a numeric target and '{target}' is {y_raw.dtype}; "
                            "set data.task: classification or pick a numeric column")
        y = y_raw.to_numpy(dtype=np.float32)
    shape = SKLEARN_IMAGE_SHAPES.get(spec.source.removeprefix("sklearn:")) if path is None else None
    return _Table(X=X_raw, y=y, task=task, classes=classes, target=str(target), image_shape=shape)


def _image_table(spec: DataSpec, path: Path) -> _Table:
    import pandas as pd

    if spec.task == "regression":
        raise DataError("data.task: an image folder is a classification task (one subfolder per class); remove "
                        "data.task: regression")
    pixels, labels, shape = load_image_folder(path)
    X = pd.DataFrame(pixels, columns=[f"px_{i}" for i in range(pixels.shape[1])], copy=False)
    y, classes = _encode_classes(pd.Series(labels), spec.target or "label")
    return _Table(X=X, y=y, task="classification", classes=classes, target=spec.target or "label",
                  image_shape=shape, passthrough=True)


def _column_list(columns: Any, limit: int = 20) -> str:
    names = [str(c) for c in columns[:limit]]
    more = f" (and {len(columns) - limit} more)" if len(columns) > limit else ""
    return ", ".join(names) + more


# --------------------------------------------------------------------------------------------- splitting


def prepare(spec: DataSpec, *, base_dir: Path | None = None, seed: int = 0) -> PreparedData:
    """Load, split (stratified for classification) and preprocess the spec's data.

    ``data.validation.folds: k`` gives k folds, each with its own preprocessing fitted on its training part;
    otherwise one train/validation split of ``fraction``.
    """
    table = _load_table(spec, base_dir)
    # Decided once on the whole table (not per split: a row number's training rows have gaps), so that every fold
    # keeps the same columns.
    dropped, notes = ([], []) if table.passthrough else screen_columns(table.X)
    if len(dropped) == table.X.shape[1]:
        raise DataError(f"data.source: every feature column is an identifier or a row number ({notes[0]}); the "
                        "data needs at least one column to learn from")
    splits = _splits(table, spec, seed)
    datasets: list[Dataset] = []
    exported: tuple[ColumnTransformer, pd.DataFrame] | None = None  # fold 1's preprocessor and raw rows
    for train_idx, val_idx in splits:
        X_tr, X_va = table.X.iloc[train_idx], table.X.iloc[val_idx]
        pre = passthrough_preprocessor(X_tr) if table.passthrough else make_preprocessor(X_tr, drop=dropped)
        Xt = pre.fit_transform(X_tr).astype(np.float32, copy=False)
        Xv = pre.transform(X_va).astype(np.float32, copy=False)
        datasets.append(Dataset(
            task=table.task,
            X_train=np.ascontiguousarray(Xt),
            y_train=table.y[train_idx],
            X_val=np.ascontiguousarray(Xv),
            y_val=table.y[val_idx],
            feature_names=[str(n) for n in pre.get_feature_names_out()],
            classes=[_plain(c) for c in table.classes],
            target=table.target,
            image_shape=table.image_shape,
        ))
        exported = exported or (pre, X_va)
    if exported is None:  # unreachable: _splits gives one split or at least two folds
        raise DataError("data.validation: the data gave no split")
    pre, X_va = exported
    return PreparedData(
        dataset=datasets[0],
        preprocessor=pre,
        columns=[str(c) for c in table.X.columns],
        dtypes={str(c): str(t) for c, t in table.X.dtypes.items()},
        example=X_va.head(5),
        raw_val=X_va,
        folds=datasets if spec.validation.folds else None,
        notes=notes,
    )


def prepare_all_rows(spec: DataSpec, *, base_dir: Path | None = None, seed: int = 0
                     ) -> tuple[Dataset, ColumnTransformer]:
    """Every row as a training row, and the preprocessing fitted on them all: what a refit trains on
    (``final_model.refit``). The same columns are left out as in ``prepare``.

    Its validation rows are a sample of the training rows: trainers report metrics on them, which say nothing here
    (the model was trained on them), so they are kept few.
    """
    table = _load_table(spec, base_dir)
    dropped = [] if table.passthrough else screen_columns(table.X)[0]
    pre = passthrough_preprocessor(table.X) if table.passthrough else make_preprocessor(table.X, drop=dropped)
    X = np.ascontiguousarray(pre.fit_transform(table.X).astype(np.float32, copy=False))
    sample = np.random.default_rng(seed).choice(len(X), size=min(len(X), REFIT_REPORT_ROWS), replace=False)
    dataset = Dataset(task=table.task, X_train=X, y_train=table.y, X_val=X[sample], y_val=table.y[sample],
                      feature_names=[str(n) for n in pre.get_feature_names_out()],
                      classes=[_plain(c) for c in table.classes], target=table.target, image_shape=table.image_shape)
    return dataset, pre


def _splits(table: _Table, spec: DataSpec, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row indices of (train, validation): one split of ``fraction``, or one pair per fold."""
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    n = len(table.y)
    stratified = table.task == "classification" and spec.validation.stratify
    folds = spec.validation.folds
    if folds:
        splitter = (StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed) if stratified
                    else KFold(n_splits=folds, shuffle=True, random_state=seed))
        try:
            return list(splitter.split(np.zeros((n, 1)), table.y))
        except ValueError as exc:
            raise DataError(f"data.validation.folds: cannot split {n} rows into {folds} folds ({_first_line(exc)}); "
                            "use fewer folds") from None
    try:
        # Splitting row numbers gives exactly the rows train_test_split(X, y) would: same permutation.
        train_idx, val_idx = train_test_split(np.arange(n), test_size=spec.validation.fraction, random_state=seed,
                                              stratify=table.y if stratified else None)
    except ValueError as exc:
        fix = "; set data.validation.stratify: false or drop the rare classes" if stratified else ""
        raise DataError(f"data.validation: cannot split the data: {_first_line(exc)}{fix}") from None
    return [(train_idx, val_idx)]


# --------------------------------------------------------------------------------------------- preprocessing


def screen_columns(X: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The feature columns to leave out, and one sentence per decision (``PreparedData.notes``).

    Left out (the rule ``COLUMN_RULE`` states, printed in the run header):
    - a text column whose distinct values are more than ``MAX_CATEGORIES`` and more than ``ID_DISTINCT_FRACTION``
      of the rows (an identifier or free text: one-hot encoding it would give a column per row and nothing that
      generalises);
    - a text column of more than ``MAX_CATEGORIES`` distinct values averaging at least ``FREE_TEXT_WORDS`` words
      (free text: a comment, a description);
    - an integer column whose values are all distinct and consecutive, none missing, in more than
      ``ROW_NUMBER_MIN_ROWS`` rows (a row number such as 1..891: it tells where the row is in the file, not what
      it is), or all distinct under a name that says it is an identifier (``ID_WORDS``: id, passenger_id, key).
    A kept text column of more than ``MAX_CATEGORIES`` values is noted as capped.
    """
    import pandas as pd

    rows = len(X)
    dropped: list[str] = []
    notes: list[str] = []
    capped: list[str] = []
    for column in X.columns:
        values = X[column]
        if _is_number(values):
            if pd.api.types.is_integer_dtype(values) and rows > ROW_NUMBER_MIN_ROWS and not values.isna().any():
                low, high = int(values.min()), int(values.max())
                if values.nunique() == rows and high - low + 1 == rows:
                    dropped.append(column)
                    notes.append(f"dropped '{column}' (a row number: the integers {low} to {high}, each once)")
                elif values.nunique() == rows and _named_as_id(str(column)):
                    dropped.append(column)
                    notes.append(f"dropped '{column}' (an identifier: named so, a distinct integer in every row)")
            continue
        distinct = int(values.nunique(dropna=True))
        if distinct <= MAX_CATEGORIES:
            continue
        words = _mean_words(values)
        if words >= FREE_TEXT_WORDS:
            dropped.append(column)
            notes.append(f"dropped '{column}' (free text: {distinct} distinct values of {words:.1f} words on "
                         "average)")
        elif distinct > ID_DISTINCT_FRACTION * rows:
            dropped.append(column)
            notes.append(f"dropped '{column}' (ID-like: {distinct} distinct values in {rows} rows)")
        else:
            capped.append(f"'{column}' ({distinct} distinct)")
    if capped:
        notes.append(f"one-hot capped at {MAX_CATEGORIES} categories: {', '.join(capped)}; the rarer values and "
                     "values unseen in training share one column")
    return dropped, notes


COLUMN_RULE = (f"columns left out: text with more than {MAX_CATEGORIES} distinct values that are over "
               f"{ID_DISTINCT_FRACTION:.0%} of the rows (an ID) or average {FREE_TEXT_WORDS:g}+ words (free text); "
               f"integers distinct in every row that count 1..n (a row number) or are named as an ID (id, *_id, key); "
               f"other text is one-hot encoded, at most {MAX_CATEGORIES} columns each")


def _named_as_id(name: str) -> bool:
    if re.fullmatch(r"Unnamed: \d+", name):
        return True
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return bool(words) and words[-1] in ID_WORDS


def _mean_words(values: pd.Series) -> float:
    sample = values.dropna().head(FREE_TEXT_SAMPLE).astype(str)
    return float(sample.str.split().str.len().mean()) if len(sample) else 0.0


def make_preprocessor(X: pd.DataFrame, *, drop: Collection[str] = ()) -> ColumnTransformer:
    """Median-impute and scale numbers; mode-impute and one-hot encode the rest, at most ``MAX_CATEGORIES``
    columns each (values seen in fewer than ``MIN_CATEGORY_ROWS`` training rows, the rarest past the cap, and at
    predict time values never seen in training share the last column; without rare values, an unseen value is
    all zeros). The columns in ``drop`` are left out: only the columns named are used, the others are ignored,
    so rows still carrying them are transformed as before."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    skip = set(drop)
    kept = [c for c in X.columns if c not in skip]
    numeric = [c for c in kept if _is_number(X[c])]
    other = [c for c in kept if c not in numeric]
    steps = []
    if numeric:
        steps.append(
            ("num", Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                              ("scale", StandardScaler())]), numeric)
        )
    if other:
        onehot = OneHotEncoder(max_categories=MAX_CATEGORIES, min_frequency=MIN_CATEGORY_ROWS,
                               handle_unknown="infrequent_if_exist", sparse_output=False)
        steps.append(
            ("cat", Pipeline([("impute", SimpleImputer(strategy="most_frequent", keep_empty_features=True)),
                              ("onehot", onehot)]), other)
        )
    return ColumnTransformer(steps, remainder="drop", sparse_threshold=0.0, verbose_feature_names_out=False)


def _is_number(values: pd.Series) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values))


def passthrough_preprocessor(X: pd.DataFrame) -> ColumnTransformer:
    """Image pixels, already scaled to [0, 1]: passed through unchanged, so that every bundle has a
    preprocessor that selects and orders its input columns (``px_0``, ``px_1``, ...) the same way."""
    from sklearn.compose import ColumnTransformer

    return ColumnTransformer([("pixels", "passthrough", list(X.columns))], remainder="drop", sparse_threshold=0.0,
                             verbose_feature_names_out=False)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so classes serialise to JSON and compare equal after a round trip."""
    return value.item() if isinstance(value, np.generic) else value


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
