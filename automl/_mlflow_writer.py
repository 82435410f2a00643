"""Entry point of the MLflow writer process: ``python -P -m automl._mlflow_writer`` (the tracking URI in the
environment, ``MLFLOW_TRACKING_URI``: never on the command line, where ``ps`` shows it)."""

import os

if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from automl.tracking import writer_main

    writer_main()
