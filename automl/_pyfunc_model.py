"""MLflow "models from code" entry point: the exported pyfunc model is this file plus the bundle artifact.

Loading it imports automl's own code; nothing is unpickled (MLflow would otherwise cloudpickle the model).
"""

import mlflow

from automl.export import AutoMLPyfunc

mlflow.models.set_model(AutoMLPyfunc())
