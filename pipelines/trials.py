"""A trial: one short Ray Train run inside a Ray Tune grid, the unit the sweep (tuning/sweep.py) and the study
(pipelines/study.py) both schedule. The stage-level half of their machinery: what a trial runs, what it is called,
how many run at once, how its MLflow run ends, and the judge its proxy FID is scored by."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sddit.config import Config, apply_overrides
from sddit.errors import ConfigError
from pipelines.tracking import tag_query


@dataclass
class TrialContext:
    """What every trial of one sweep or study shares; Tune hands it to each trial (trial_trainable). A sweep's
    trials are named by its `sweep_name` and take their searched `space_keys` from the trial's values; a study's
    trial names one of its fixed `runs`."""
    base_config: Config
    data: str                           # the dataset's absolute path
    mlflow_uri: str
    experiment_id: str
    parent_run_id: str | None           # the sweep's or study's MLflow run, each trial's parent
    storage: str
    cpus_per_worker: float
    gpus_per_worker: float = 0
    workers: int = 1
    proxy: dict | None = None           # every, num_samples, heun_steps, extractor[, reference]
    sweep_name: str | None = None
    space_keys: list[str] = field(default_factory=list)
    # a study: label -> its run (overrides, params, name; and where it differs from the study's: data,
    # init_from, proxy)
    runs: dict[str, dict] | None = None


def run_trial(trial: dict, context: TrialContext) -> None:
    """Tune function trainable: fit a TorchTrainer on this trial's config; metrics reach Tune via the callback.

    A sweep's trial holds searched values of config fields; a study's trial (pipelines/study.py) names one
    of the fixed runs in context.runs (an arm x seed: its overrides and a name that stays the same
    across reruns, so an interrupted run continues from its checkpoint; a run may bring its own dataset, its
    initial weights and its evaluation, as a study's resolution-transfer stages do)."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.common import quiet_exit_in_finalizers, torch_trainer, train_logging, verbose
    from pipelines.train import WorkerContext, train_worker
    quiet_exit_in_finalizers()
    run_spec = {}
    if context.runs is not None:
        run_spec = context.runs[trial["run"]]
        overrides, tagged = run_spec["overrides"], run_spec["params"]
    else:
        tagged = {f"searched.{key}": trial[key] for key in context.space_keys}
        overrides = [f"{key[len('searched.'):]}={value}" for key, value in tagged.items()]
    name = trial_name(context, trial, tune.get_context().get_trial_id())
    config = apply_overrides(context.base_config, overrides)
    # the trial's MLflow run is found or created by its rank-0 worker, which loads MLflow anyway, and ended by
    # the driver (TrialRuns): loading MLflow here too would delay each trial's workers by its import
    mlflow_run = {"experiment_id": context.experiment_id, "name": name, "params": {**config.flat(), **tagged},
                  "parent_run_id": context.parent_run_id}
    trainer = torch_trainer(
        train_worker, in_trial=True,
        train_loop_config={"context": WorkerContext(
            config=config, data=run_spec.get("data", context.data), init_from=run_spec.get("init_from"),
            mlflow_uri=context.mlflow_uri, mlflow_run=mlflow_run, cpus_per_worker=context.cpus_per_worker,
            proxy=run_spec.get("proxy", context.proxy), name=name, verbose=verbose())},
        scaling_config=ScalingConfig(num_workers=context.workers, use_gpu=context.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": context.cpus_per_worker,
                                                           "GPU": context.gpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=context.storage, callbacks=[TuneReportCallback()],
                             logging_config=train_logging(),
                             failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


def trial_name(context: TrialContext, trial_config: dict, trial_id: str) -> str:
    """The Ray Train run name (and MLflow training name) of a trial: a study's run keeps its own name across
    invocations; a sweep's trial is named by its Tune trial id."""
    if context.runs is not None:
        return context.runs[trial_config["run"]]["name"]
    return f"{context.sweep_name}-{trial_id}"


def trial_runs_callback(context: TrialContext):
    """A Tune callback on the driver that ends each trial's MLflow run when the trial ends: FINISHED when it
    completed (or a scheduler stopped it), FAILED when it errored. A trial killed with the sweep stays RUNNING,
    as an interrupted training does. (Tune pickles it with the experiment, for --resume: no client inside.)"""
    from ray import tune

    class TrialRuns(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.end(trial, "FAILED")

        def end(self, trial, status: str):
            from mlflow import MlflowClient
            client = MlflowClient(context.mlflow_uri)
            name = trial_name(context, trial.config, trial.trial_id)
            found = client.search_runs([context.experiment_id], tag_query({"sddit.train_name": name}),
                                            max_results=1, order_by=["attributes.start_time DESC"])
            if found:                       # none when the trial failed before its rank 0 got that far
                client.set_terminated(found[0].info.run_id, status)

    return TrialRuns()


def trial_trainable(context: TrialContext):
    """The trial function with its shared context. It only drives its TorchTrainer: no CPU of its own (its
    workers hold them), just a token of memory, since Tune refuses an empty resource request. The context
    goes in through with_parameters, so Tune's progress tables show only the trial's own values."""
    from ray import tune
    return tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": 0, "memory": 64 * 2**20})


def trial_resources(ray, workers_per_trial: int, gpus_per_trial: float, max_concurrent: int | None):
    """(concurrent trials, CPUs per worker, GPUs per worker): by default as many trials at once as the cluster
    holds with at least one CPU per worker, so a small machine never deadlocks; the CPUs are then shared evenly
    among the running workers. An explicit `max_concurrent` beyond that shares the CPUs in fractions (one torch
    thread per worker); GPUs are never shared that way. On 2 cores that was slower, not faster: 4 demo trials
    at once spent longer starting their processes than 2 waves of 2 (README, "What the demo shows")."""
    from pipelines.common import cpus_per_worker as fitting_cpus
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    fits = cpus // workers_per_trial
    if gpus_per_trial:
        fits = min(fits, int(gpus // gpus_per_trial))
        if fits < 1:
            raise ConfigError("gpus_per_trial", f"a trial needs {gpus_per_trial} GPUs; the cluster has {gpus}")
    if fits < 1 and not max_concurrent:
        raise ConfigError("workers_per_trial", f"a trial needs {workers_per_trial} CPUs and {gpus_per_trial} "
                                               f"GPUs; the cluster has {cpus} CPUs and {gpus} GPUs")
    concurrent = max_concurrent or fits
    if gpus_per_trial:
        concurrent = min(concurrent, fits)
    gpus_per_worker = gpus_per_trial / workers_per_trial if gpus_per_trial else 0
    workers = concurrent * workers_per_trial
    if workers > cpus:
        return concurrent, cpus / workers, gpus_per_worker
    return concurrent, fitting_cpus(ray, workers), gpus_per_worker


def prepare_judge(extractor: str, judge_dir) -> dict:
    """The domain judge is trained on first use and cached with its shards, and so are its reference
    statistics: make both once here, not in each of the first trials at the same time. Returns what
    identifies the judge: FIDs compare only between samples scored by the same network."""
    if extractor != "domain":
        return {"extractor": extractor}
    from sddit.reference import load_reference, make_extractor
    judge = make_extractor("domain", dataset_dir=judge_dir)
    load_reference(None, judge, dataset_dir=judge_dir)
    return {"extractor": extractor, "weights_sha256": judge.weights_checksum, "held_out_accuracy": judge.accuracy}


def latest_checkpoint(train_run: Path) -> str | None:
    """A trial's last checkpoint, from its Ray Train run directory (Tune can drop the final report)."""
    found = sorted(p.parent for p in train_run.glob("checkpoint_*/checkpoint.pt"))
    return str(found[-1]) if found else None


def root_cause(error: BaseException) -> str:
    """The innermost exception's line ('sddit.errors.ConfigError: optim.lr: must be > 0'), not Ray's wrapper."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else repr(error))[:300]
