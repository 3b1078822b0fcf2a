"""MLflow glue shared by the stages: one store, absolute URIs, a child run per stage."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
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

    from pipelines.common import verbose
    if not verbose():   # the store's INFO lines (creating and migrating tables, a new experiment) are noise
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(EXPERIMENT)
    if experiment.tags.get(KIND_TAG) != KIND:
        mlflow.MlflowClient(uri).set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    return experiment


def params_key(params: dict) -> str:
    """A short digest of a run's parameters: what makes two runs of a stage 'the same run'."""
    text = json.dumps({key: str(value) for key, value in params.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tag_query(tags: dict[str, str]) -> str:
    """An MLflow search filter matching runs that carry all of `tags`."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def unfinished_run(tags: dict[str, str]):
    """The most recent run with these tags that never finished (killed: still RUNNING; or FAILED), or None."""
    import mlflow

    runs = mlflow.search_runs(filter_string=tag_query(tags) + " and attributes.status != 'FINISHED'",
                              output_format="list",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


@contextlib.contextmanager
def stage_run(stage: str, run_dir: str | Path, *, params: dict | None = None, parent_run_id: str | None = None,
              started: float | None = None):
    """An MLflow run for one stage; a child of `parent_run_id` (or $SDDIT_PARENT_RUN_ID) if given. Under a
    parent, the same stage with the same parameters continues its earlier child, so a pipeline run that is
    continued after an interruption does not list a stage twice. `started` (time.time() when the stage
    began) is the run's start time: a stage logs once its work is done, and the UI's Duration should be the
    stage's wall time, not the time its logging took."""
    import mlflow

    experiment = use_store(tracking_uri(run_dir))
    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    params = {key: str(value)[:500] for key, value in (params or {}).items()}
    tags = {"sddit.stage": stage, "sddit.stage_key": params_key(params)}
    earlier = None
    if parent:
        earlier = mlflow.search_runs(filter_string=tag_query({**tags, "mlflow.parentRunId": parent}),
                                     output_format="list", max_results=1)
    if earlier:
        context = mlflow.start_run(run_id=earlier[0].info.run_id, nested=mlflow.active_run() is not None)
    elif started is not None:
        if parent:
            tags["mlflow.parentRunId"] = parent
        created = mlflow.MlflowClient().create_run(experiment.experiment_id, start_time=int(started * 1000),
                                                   tags=tags, run_name=stage)
        context = mlflow.start_run(run_id=created.info.run_id, nested=mlflow.active_run() is not None)
    else:
        context = mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags)
    with context as run:
        if params and not earlier:
            mlflow.log_params(params)
        yield run
