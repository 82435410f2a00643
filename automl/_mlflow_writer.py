"""Entry point of the MLflow writer process: ``python -m automl._mlflow_writer TRACKING_URI``."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from automl.tracking import writer_main

    writer_main(sys.argv[1])
