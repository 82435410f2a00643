"""Loading (pandas) and preprocessing (scikit-learn): spec ``data`` -> a ``Dataset`` the trainers share.

The preprocessing is fitted on the training split only, and travels with every exported model, so that a
model takes the same raw rows (original columns, missing values, unseen categories) that the data file had.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automl.errors import DataError
from automl.trainer import Dataset

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.compose import ColumnTransformer

    from automl.spec import DataSpec

SKLEARN_DATASETS = {
    "digits": "load_digits",
    "iris": "load_iris",
    "wine": "load_wine",
    "breast_cancer": "load_breast_cancer",
    "diabetes": "load_diabetes",
}
# An integer target with at most this many distinct values is taken as class labels (task: auto).
MAX_CLASSES_FOR_INTEGER_TARGET = 20


@dataclass
class PreparedData:
    """The dataset trainers see, and what an exported model needs to take raw rows."""

    dataset: Dataset
    preprocessor: ColumnTransformer
    columns: list[str]
    dtypes: dict[str, str]
    example: pd.DataFrame  # a few raw validation rows: the input example of the exported model
    raw_val: pd.DataFrame


def load_frame(source: str, base_dir: Path | None = None) -> tuple[pd.DataFrame, str | None]:
    """Read ``sklearn:<name>``, a ``.csv`` or a ``.parquet`` file; return the frame and its own target name."""
    import pandas as pd

    if source.startswith("sklearn:"):
        name = source.removeprefix("sklearn:")
        if name not in SKLEARN_DATASETS:
            raise DataError(
                f"data.source: unknown bundled dataset '{name}'; use one of {', '.join(SKLEARN_DATASETS)}"
            )
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, SKLEARN_DATASETS[name])(as_frame=True)
        return bunch.frame, "target"
    path = Path(source)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"data.source: {path.name} is neither .csv nor .parquet")
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"data.source: {path.name} is empty") from None
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        raise DataError(f"data.source: cannot read {path.name}: {str(exc).splitlines()[0]}") from None
    if frame.empty:
        raise DataError(f"data.source: {path.name} has no rows")
    return frame, None


def infer_task(target: pd.Series) -> str:
    """classification for text, boolean, categorical and integer targets with few values; else regression."""
    import pandas as pd

    if not (pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target)):
        return "classification"
    values = target.dropna()
    if pd.api.types.is_integer_dtype(values) or bool((values == values.round()).all()):
        if values.nunique() <= MAX_CLASSES_FOR_INTEGER_TARGET:
            return "classification"
    return "regression"


def prepare(spec: DataSpec, *, base_dir: Path | None = None, seed: int = 0) -> PreparedData:
    """Load, split (stratified for classification) and preprocess the spec's data."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    frame, own_target = load_frame(spec.source, base_dir)
    target = spec.target or own_target
    if target is None:
        raise DataError("data.target: name the column to predict (data.target: <column>)")
    if target not in frame.columns:
        columns = ", ".join(map(str, frame.columns[:20]))
        raise DataError(f"data.target: column '{target}' not found; the columns are: {columns}")
    frame = frame[frame[target].notna()]
    y_raw = frame[target]
    X_raw = frame.drop(columns=[target])
    if X_raw.shape[1] == 0:
        raise DataError("data.source: there are no feature columns besides the target")
    task = infer_task(y_raw) if spec.task == "auto" else spec.task

    classes: list[Any] = []
    if task == "classification":
        classes = sorted(y_raw.unique().tolist(), key=lambda v: (str(type(v)), v))
        if len(classes) < 2:
            raise DataError(f"data.target: '{target}' has a single class ({classes[0]!r}); nothing to learn")
        index = {c: i for i, c in enumerate(classes)}
        y = y_raw.map(index).to_numpy(dtype=np.int64)
    else:
        if not pd.api.types.is_numeric_dtype(y_raw) or pd.api.types.is_bool_dtype(y_raw):
            raise DataError(f"data.target: regression needs a numeric target; '{target}' is {y_raw.dtype}")
        y = y_raw.to_numpy(dtype=np.float32)

    stratify = y if (task == "classification" and spec.validation.stratify) else None
    try:
        X_tr, X_va, y_tr, y_va = train_test_split(
            X_raw, y, test_size=spec.validation.fraction, random_state=seed, stratify=stratify
        )
    except ValueError as exc:
        raise DataError(f"data.validation: cannot split the data: {exc}") from None

    pre = make_preprocessor(X_tr)
    Xt = pre.fit_transform(X_tr).astype(np.float32)
    Xv = pre.transform(X_va).astype(np.float32)
    dataset = Dataset(
        task=task,
        X_train=np.ascontiguousarray(Xt),
        y_train=y_tr,
        X_val=np.ascontiguousarray(Xv),
        y_val=y_va,
        feature_names=[str(n) for n in pre.get_feature_names_out()],
        classes=[_plain(c) for c in classes],
        target=str(target),
    )
    return PreparedData(
        dataset=dataset,
        preprocessor=pre,
        columns=[str(c) for c in X_raw.columns],
        dtypes={str(c): str(t) for c, t in X_raw.dtypes.items()},
        example=X_va.head(5),
        raw_val=X_va,
    )


def make_preprocessor(X: pd.DataFrame) -> ColumnTransformer:
    """Median-impute and scale numbers; mode-impute and one-hot encode the rest (unknown categories -> 0)."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = [c for c in X.columns if pd.api.types.is_numeric_dtype(X[c]) and not pd.api.types.is_bool_dtype(X[c])]
    other = [c for c in X.columns if c not in numeric]
    steps = []
    if numeric:
        steps.append(
            ("num", Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                              ("scale", StandardScaler())]), numeric)
        )
    if other:
        steps.append(
            ("cat", Pipeline([("impute", SimpleImputer(strategy="most_frequent", keep_empty_features=True)),
                              ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False))]), other)
        )
    return ColumnTransformer(steps, remainder="drop", sparse_threshold=0.0, verbose_feature_names_out=False)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so classes serialise to JSON and compare equal after a round trip."""
    return value.item() if isinstance(value, np.generic) else value
