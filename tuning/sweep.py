"""Stage 3, tune: Ray Tune sweeps over mask ratio, teacher sigma and temperatures.

    python tuning/sweep.py --data runs/demo/data --preset demo --num-samples 8 --budget-steps 300

Each trial is a short Ray Train run (a TorchTrainer per trial, Train V2 style) that reports a
proxy quality metric (FID on a few hundred samples from the generation EMA, against the
dataset, with the extractor the preset calls for) every --proxy-every steps; ASHA stops the
weak trials early. The best trial's config is written as a YAML preset (and its checkpoint path
to best.json) for the final training. Re-running with --resume continues an interrupted sweep
without rerunning finished trials; a trial that fails is recorded and the sweep goes on.
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sddit.config import apply_overrides, load_preset, preset_names, save_config
from sddit.data import Manifest
from sddit.errors import ConfigError
from pipelines.common import (parse_options, require_at_least, run_cli, set_verbose, shared_options,
                              warn_about_layout)
from pipelines.tracking import tag_query
from pipelines.trials import (TrialContext, latest_checkpoint, prepare_judge, root_cause, trial_resources,
                              trial_runs_callback, trial_trainable)

DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "sddit" / "presets" / "spaces" / "default.yaml"
SPACE_TYPES = ("uniform", "loguniform", "choice", "grid")


@dataclass
class SweepOptions:
    """What one sweep does (the command line's flags, typed; checked here for every caller)."""
    data: str
    preset: str = "demo"
    space: str = str(DEFAULT_SPACE)
    num_samples: int = 8
    search: str = "random"
    scheduler: str = "asha"
    budget_steps: int = 300
    grace_steps: int | None = None      # None: budget_steps / 4
    proxy_every: int | None = None      # None: grace_steps
    proxy_samples: int = 200
    proxy_heun_steps: int = 18
    workers_per_trial: int = 1
    gpus_per_trial: int = 0
    max_concurrent: int | None = None
    seed: int = 0
    name: str | None = None
    resume: bool = False
    overrides: list[str] = field(default_factory=list)
    run_dir: str = "runs"
    storage: str | None = None
    address: str | None = None
    verbose: bool = False

    def __post_init__(self):
        for flag, choices in (("search", ("random", "optuna", "grid")), ("scheduler", ("asha", "none"))):
            if getattr(self, flag) not in choices:
                raise ConfigError(f"--{flag}", f"must be one of {', '.join(choices)}, got {getattr(self, flag)!r}")
        # refused here, not minutes later inside a trial
        require_at_least(self, num_samples=1, budget_steps=1, proxy_samples=1, proxy_heun_steps=1, workers_per_trial=1)
        self.grace_steps = self.grace_steps or max(self.budget_steps // 4, 1)
        self.proxy_every = self.proxy_every or self.grace_steps


def parse_args(argv=None) -> SweepOptions:
    shared = shared_options("--set", "--run-dir", "--storage", "--address", "--verbose",
                            set="fixed overrides of the base preset for every trial")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared])
    parser.add_argument("--data", required=True, help="dataset directory written by pipelines/encode.py")
    parser.add_argument("--preset", default="demo", help=f"base preset ({', '.join(preset_names())}) or YAML path")
    parser.add_argument("--space", default=str(DEFAULT_SPACE), help="search-space YAML (default: the shipped default space)")
    parser.add_argument("--num-samples", type=int, default=8, help="trials (for grid spaces: repeats of the grid)")
    parser.add_argument("--search", default="random", choices=["random", "optuna", "grid"], help="search algorithm")
    parser.add_argument("--scheduler", default="asha", choices=["asha", "none"], help="early stopping (default asha)")
    parser.add_argument("--budget-steps", type=int, default=300, help="training steps per trial at most (default 300)")
    parser.add_argument("--grace-steps", type=int, default=None, help="ASHA: steps before a trial can be stopped (default budget/4)")
    parser.add_argument("--proxy-every", type=int, default=None,
                        help="steps between reports of the proxy metric (default: the grace period)")
    parser.add_argument("--proxy-samples", type=int, default=200, help="samples per proxy FID (default 200)")
    parser.add_argument("--proxy-heun-steps", type=int, default=18,
                        help="EDM Heun steps per proxy sample (default 18; 2 * steps - 1 network evaluations)")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=int, default=0, help="GPUs per trial, spread over its workers (default 0)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster fits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search algorithm (random, optuna)")
    parser.add_argument("--name", default=None, help="sweep name (default sweep-<preset>); --resume needs the same name")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    return parse_options(parser, SweepOptions, argv)


def load_space(path: str | Path, config_keys: set[str]) -> dict:
    """{'model.mask_ratio': {'type': 'uniform', 'low': 0, 'high': 0.7}, ...}, checked field by field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("space", f"no such search-space file: {path}")
    space = yaml.safe_load(path.read_text()) or {}
    if not space:
        raise ConfigError("space", f"{path} defines no parameters")
    for key, spec in space.items():
        if key not in config_keys:
            raise ConfigError(f"space.{key}", f"{path}: not a config field (SECTION.FIELD)")
        if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
            raise ConfigError(f"space.{key}", f"{path}: expected {{type: {'|'.join(SPACE_TYPES)}, ...}}, got {spec!r}")
        if spec["type"] in ("uniform", "loguniform") and not ("low" in spec and "high" in spec and spec["low"] < spec["high"]):
            raise ConfigError(f"space.{key}", f"{path}: needs low < high")
        if spec["type"] in ("choice", "grid") and not spec.get("values"):
            raise ConfigError(f"space.{key}", f"{path}: needs a non-empty list of values")
    return space


def tune_domain(space: dict) -> dict:
    from ray import tune
    make = {"uniform": lambda s: tune.uniform(s["low"], s["high"]),
            "loguniform": lambda s: tune.loguniform(s["low"], s["high"]),
            "choice": lambda s: tune.choice(s["values"]),
            "grid": lambda s: tune.grid_search(s["values"])}
    return {key: make[spec["type"]](spec) for key, spec in space.items()}


def make_searcher(search: str, metric: str, seed: int, max_concurrent: int = 0):
    """Optuna (TPE), or Tune's own generator for random and grid search; seeded either way, so the
    same command samples the same trials. Tune ignores TuneConfig.max_concurrent_trials for its own
    generator, so that one takes the limit itself."""
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        return OptunaSearch(metric=metric, mode="min", seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

def sweep(args: SweepOptions) -> dict:
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipelines.common import init_ray, tune_verbosity
    from pipelines.tracking import PARENT_ENV, tracking_uri, use_store
    from sddit.training import fit_to_dataset

    set_verbose(args.verbose)
    # everything that can be wrong is checked before Ray starts
    # trials run the preset for the sweep's budget; the best config keeps the preset's own schedule
    manifest = Manifest.read(args.data)
    warn_about_layout("sweep", manifest, args.data)
    preset = fit_to_dataset(apply_overrides(load_preset(args.preset), list(args.overrides)), manifest, args.data)
    base = apply_overrides(preset, [f"train.steps={args.budget_steps}", f"train.checkpoint_every={args.proxy_every}",
                                    f"train.log_every={args.proxy_every}", f"train.sample_every={args.budget_steps}"])
    space = load_space(args.space, set(base.flat()))
    extractor = "domain" if base.data.codec == "pixel" else "inception"
    metric = f"proxy_fid_{extractor}"
    name = args.name or f"sweep-{Path(args.preset).stem}"
    storage = Path(args.storage or Path(args.run_dir) / "ray").resolve()

    # The judge trains on one CPU thread for several seconds and the trials need it only for their first proxy
    # FID, so it trains while their processes start instead of before (a trial that got there first would train
    # the same network itself: same rows, seed and single thread; both caches are written atomically)
    judge = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge").submit(prepare_judge, extractor, args.data)
    ray = init_ray(args.address)
    max_concurrent, cpus_per_worker, gpus_per_worker = trial_resources(
        ray, args.workers_per_trial, args.gpus_per_trial, args.max_concurrent)

    uri = tracking_uri(args.run_dir)
    experiment = use_store(uri)
    parent = os.environ.get(PARENT_ENV) or None
    existing = mlflow.search_runs(filter_string=tag_query({"sddit.sweep_name": name}), output_format="list")
    run_ctx = (mlflow.start_run(run_id=existing[0].info.run_id, nested=mlflow.active_run() is not None)
               if existing and args.resume else
               mlflow.start_run(run_name=name, parent_run_id=parent, nested=parent is not None,
                                tags={"sddit.stage": "tune", "sddit.sweep_name": name}))
    with run_ctx as sweep_run:
        if not (existing and args.resume):
            mlflow.log_params({"preset": args.preset, "space": str(args.space), "search": args.search,
                               "scheduler": args.scheduler, "num_samples": args.num_samples,
                               "budget_steps": args.budget_steps, "grace_steps": args.grace_steps,
                               "proxy_metric": metric, "proxy_samples": args.proxy_samples,
                               "proxy_heun_steps": args.proxy_heun_steps,
                               "max_concurrent_trials": max_concurrent, "seed": args.seed})
            mlflow.log_dict(space, "search_space.yaml")
        context = TrialContext(
            base_config=base, data=str(Path(args.data).resolve()), space_keys=list(space), sweep_name=name,
            parent_run_id=sweep_run.info.run_id, mlflow_uri=uri, experiment_id=experiment.experiment_id,
            storage=str(storage), workers=args.workers_per_trial, cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            proxy={"every": args.proxy_every, "num_samples": args.proxy_samples, "heun_steps": args.proxy_heun_steps,
                   "extractor": extractor})
        trainable = trial_trainable(context)
        path = storage / name
        if args.resume and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=False, restart_errored=False,
                                       resume_unfinished=True)
        else:
            searcher = make_searcher(args.search, metric, args.seed, max_concurrent)
            scheduler = (ASHAScheduler(time_attr="step", max_t=args.budget_steps, grace_period=args.grace_steps,
                                       reduction_factor=2) if args.scheduler == "asha" else FIFOScheduler())
            limit = max_concurrent if args.search == "optuna" else None   # the generator limits itself
            tuner = tune.Tuner(
                trainable,
                param_space=tune_domain(space),
                tune_config=tune.TuneConfig(metric=metric, mode="min", num_samples=args.num_samples,
                                            search_alg=searcher, scheduler=scheduler,
                                            max_concurrent_trials=limit),
                run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=tune_verbosity(),
                                          callbacks=[trial_runs_callback(context)],
                                          failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
            )
        results = tuner.fit()
        judge.result()
        return {**summarise(results, space, preset, metric, args, name), "max_concurrent": max_concurrent}


def summarise(results, space: dict, preset, metric: str, args, name: str) -> dict:
    """Best config as a preset, the best checkpoint, per-trial outcomes and the parameter plots, to MLflow."""
    import mlflow

    out = Path(args.run_dir).resolve() / "sweeps" / name
    out.mkdir(parents=True, exist_ok=True)
    storage = Path(args.storage or Path(args.run_dir) / "ray").resolve()
    trials = []
    for result in results:
        config = result.config or {}
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or "_".join(Path(result.path).name.split("_")[2:4])  # run_trial_<id>_<n>_...
        trials.append({"params": {key: config.get(key) for key in space},
                       metric: metrics.get(metric), "last_step": metrics.get("step"),
                       "step_seconds": metrics.get("step_seconds"),
                       "status": "error" if result.error else (
                           "stopped early" if (metrics.get("step") or 0) < args.budget_steps else "completed"),
                       "error": root_cause(result.error) if result.error else None,
                       "checkpoint": latest_checkpoint(storage / f"{name}-{trial_id}")})
    finished = [t for t in trials if t[metric] is not None and not t["error"]]
    if not finished:
        raise RuntimeError(f"sweep {name}: no trial reported {metric}; see {out / 'trials.json'}")
    best = min(finished, key=lambda t: t[metric])
    best_config = apply_overrides(preset, [f"{key}={value}" for key, value in best["params"].items()])
    save_config(best_config, out / "best.yaml")
    summary = {"metric": metric, "best": best, "best_config": str(out / "best.yaml"),
               "best_checkpoint": best["checkpoint"], "trials": trials}
    (out / "trials.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "best.json").write_text(json.dumps({"config": str(out / "best.yaml"), "checkpoint": best["checkpoint"],
                                               metric: best[metric], "params": best["params"]}, indent=2))
    # the plot (most of it importing matplotlib) is drawn and logged beside what follows the sweep
    summary["parameter_plot"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plot").submit(
        log_parameter_plot, finished, list(space), metric, out / "proxy_vs_params.png",
        mlflow.active_run().info.run_id)
    mlflow.log_metrics({f"best_{metric}": best[metric], "trials_errored": sum(t["status"] == "error" for t in trials),
                        "trials_stopped_early": sum(t["status"] == "stopped early" for t in trials)})
    mlflow.log_artifact(str(out / "best.yaml"))
    mlflow.log_artifact(str(out / "trials.json"))
    print(f"tune: best {metric} = {best[metric]:.4g} with {best['params']}; preset: {out / 'best.yaml'}", flush=True)
    return summary


def log_parameter_plot(trials: list[dict], keys: list[str], metric: str, path: Path, run_id: str) -> Path:
    """One scatter panel per searched parameter, the proxy metric of each finished trial against it, written
    to `path` and logged to the sweep's MLflow run. Thread-safe: matplotlib's object API, not pyplot's state."""
    import mlflow
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(keys), 3.2), layout="tight")
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        ax.scatter([t["params"][key] for t in trials], [t[metric] for t in trials], color="tab:blue")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key == "diffusion.teacher_sigma":
            ax.set_xscale("log")
    fig.savefig(path, dpi=100)
    mlflow.MlflowClient().log_artifact(run_id, str(path))
    return path


def run(options: SweepOptions, wait_for_plot: bool = True) -> dict:
    """The sweep's summary; with wait_for_plot=False its "parameter_plot" may still be drawing (a Future that
    the caller waits for before it exits, as full_run does while its final training starts)."""
    summary = sweep(options)
    if wait_for_plot:
        summary["parameter_plot"].result()
    return summary


def main(argv=None) -> dict:
    return run(parse_args(argv))


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("tune", main)


if __name__ == "__main__":
    cli()
