-- Run once by the postgres image's entrypoint (docker-entrypoint-initdb.d), when the data volume is first
-- initialised, as POSTGRES_USER (mlflow) connected to POSTGRES_DB (mlflow, MLflow's own database).
-- A second database on the same server, for Optuna studies kept in an RDB storage:
--   postgresql://mlflow:<password>@postgres:5432/optuna
-- (automl itself keeps each sweep's study in a journal file under .automl/; this database is for tools that
-- read or write Optuna's RDB storage, e.g. optuna-dashboard, and for a shared study storage.)
CREATE DATABASE optuna OWNER mlflow;
