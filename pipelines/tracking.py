"""MLflow glue shared by the stages: one store, absolute URIs, a child run per stage."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

EXPERIMENT = os.environ.get("SDDIT_EXPERIMENT", "sddit")
PARENT_ENV = "SDDIT_PARENT_RUN_ID"
# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, so the user's choice is read once, at import,
# before any stage has set one; otherwise the first store a process used would capture all later ones
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(run_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store under the run directory.

    Always absolute: Ray workers change their working directory, and a relative
    `sqlite:///mlflow.db` would silently land in a Ray temp folder.
    """
    if USER_TRACKING_URI:
        return USER_TRACKING_URI
    path = Path(run_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


# MLflow 3's UI opens experiments in its GenAI layout (traces, judges) unless told otherwise: 3.17 reads the
# layout from the URL (`workflowType`, then remembered in the browser), earlier 3.x from this experiment tag.
# The links we print carry the query; the tag is set too.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
UI_QUERY = "workflowType=machine_learning"


def use_store(uri: str):
    """Point MLflow at `uri` and the project's experiment, marked as a model-training experiment."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(EXPERIMENT)
    if experiment.tags.get(KIND_TAG) != KIND:
        mlflow.MlflowClient(uri).set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    return experiment


@contextlib.contextmanager
def stage_run(stage: str, run_dir: str | Path, *, params: dict | None = None, parent_run_id: str | None = None):
    """An MLflow run for one stage; a child of `parent_run_id` (or $SDDIT_PARENT_RUN_ID) if given."""
    import mlflow

    use_store(tracking_uri(run_dir))
    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None,
                          tags={"sddit.stage": stage}) as run:
        if params:
            mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
        yield run
