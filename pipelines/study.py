"""The paper's comparisons as one command: arms x seeds at equal images seen, FID along the way, a verdict.

    python pipelines/study.py --study paper-fig3 --data runs/data/fmnist-pixel16/train \\
        --reference runs/data/fmnist-pixel16/test --seeds 3 --images-per-arm 48000 --eval-points 4 \\
        --eval-samples 500 --out runs/studies/fig3

A study is a list of arms that differ only in the fields the paper varies; every arm trains the same
base config (--preset, --set) for the same number of images, once per seed. Each arm x seed is a
Ray Train run inside one Ray Tune grid (no early stopping, trials side by side as resources allow),
built on the trial machinery it shares with the sweep (pipelines/trials.py). At --eval-points
evenly spaced points each run samples its generation EMA without guidance (CFG 1, as the paper's
tables) and is scored with the domain extractor (pixel datasets) or Inception: FID, sFID, IS,
precision, recall, class agreement, beside the training losses and the discriminative diagnostics
(target entropy, agreement).

Output in --out and in one MLflow parent run with a child per trial: results.csv (a row per arm,
seed and evaluation point), summary.md (mean and standard deviation over seeds, and which
differences exceed the seed spread), fid_vs_images.png and fid_vs_wallclock.png. Rerunning the
same command continues: finished runs are not repeated, an interrupted one resumes from its last
checkpoint, a failed one is listed with its error (and retried on the next rerun) while the others
finish.

Cost on a 2-core CPU machine, two runs at a time, 64,000 images per run (docs/cls-signal.md): at 16 px
(64 tokens) about 13 minutes per DiT run and 20 per SD-DiT run; at 32 px (256 tokens) 49-57 and about
75. Each run's progress line tells the minutes of training steps it has left.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from sddit.config import preset_names
from sddit.errors import ConfigError
from pipelines.common import at_least, run_cli, set_verbose, shared_options
from pipelines.study_plan import ARMS, STUDIES, plan_study
from pipelines.study_report import report
from pipelines.tracking import tag_query

# ---------------------------------------------------------------------------------------------
# Command line and plan
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    shared = shared_options("--set", "--use-gpu", "--run-dir", "--storage", "--address", "--verbose",
                            set="overrides of the base config, applied to every arm (before the arm's own)",
                            use_gpu="one GPU per run (default: CPU)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared])
    parser.add_argument("--study", default=None, choices=sorted(STUDIES),
                        help="a built-in study: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in STUDIES.items()))
    parser.add_argument("--arms", default=None,
                        help="comma-separated arms instead of (or to name) a study's; built-in arms: " + ", ".join(ARMS))
    parser.add_argument("--arms-file", default=None,
                        help="YAML of your own arms: {NAME: {family: DiT|MaskDiT|SD-DiT, set: [SECTION.FIELD=VALUE]}}")
    parser.add_argument("--name", default=None, help="study name (default: --study, else 'custom'); a rerun needs the same")
    parser.add_argument("--data", required=True, help="training dataset written by pipelines/encode.py")
    parser.add_argument("--reference", default=None,
                        help="held-out dataset (written by pipelines/encode.py at the same resolution) that the FID "
                             "judge is trained on and the reference statistics come from (default: --data itself)")
    parser.add_argument("--pretrain-data", default=None,
                        help="dataset at a lower resolution (same codec) for the -transfer arms' pre-training runs")
    parser.add_argument("--pretrain-images", type=at_least(1), default=None,
                        help="images each -transfer arm pre-trains on at --pretrain-data's resolution (default: "
                             "--images-per-arm); the cost is reported beside the results, not subtracted from them")
    parser.add_argument("--preset", default=None,
                        help=f"base config every arm shares: backbone, batch, lr ({', '.join(preset_names())} or a "
                             f"YAML path; default fashion-mnist for pixel datasets, imagenet256-S2 for SD-VAE latents)")
    parser.add_argument("--seeds", type=at_least(1), default=3, help="seeds per arm, 0..N-1 (train.seed; default 3)")
    parser.add_argument("--images-per-arm", type=at_least(1), default=48_000,
                        help="training images per run (rounded up to whole evaluation intervals; default 48000)")
    parser.add_argument("--eval-points", type=at_least(1), default=4, help="evenly spaced evaluation points per run (default 4)")
    parser.add_argument("--eval-samples", type=at_least(2), default=500,
                        help="samples per evaluation (default 500; at least 2, for FID's covariance)")
    parser.add_argument("--eval-heun-steps", type=at_least(1), default=12,
                        help="EDM Heun steps per evaluation sample (default 12; 2 * steps - 1 network evaluations)")
    parser.add_argument("--out", required=True, help="output folder: results.csv, summary.md, plots, trials/")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report of the runs recorded so far (a study stopped part-way; "
                             "unfinished runs are listed as such and continue on a later rerun without this flag)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="runs at once (default: what the cluster fits)")
    args = parser.parse_args(argv)
    if not args.study and not args.arms:
        parser.error("give --study NAME or --arms A,B,...")
    args.name = args.name or args.study or "custom"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        parser.error(f"--name {args.name!r}: use letters, digits, '.', '_' and '-'")
    return args


# ---------------------------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------------------------

def newest_checkpoint_folder(run_folder: Path) -> Path | None:
    """The newest checkpoint folder a run left in its Ray Train storage folder, or None."""
    found = sorted(run_folder.glob("checkpoint_*/checkpoint.pt"))            # Ray names them by time
    return found[-1].parent if found else None


def last_checkpoint(storage: Path, name: str) -> tuple[Path, int] | None:
    """(folder, step) of the newest checkpoint run `name` left in its Ray Train storage, or None."""
    from sddit.checkpoint import load_checkpoint
    folder = newest_checkpoint_folder(storage / name)
    return (folder, load_checkpoint(folder)["step"]) if folder else None


def final_checkpoint(storage: Path, run: dict) -> Path | None:
    """The checkpoint a finished pre-training run left in its Ray Train storage, or None."""
    last = last_checkpoint(storage, run["name"])
    return last[0] if last and last[1] >= run["steps"] else None


def storage_of(args) -> Path:
    return Path(args.storage or Path(args.run_dir) / "ray").resolve()


def run_grid(args, plan: dict, todo: list[str], parent_run_id: str, uri: str, runs: dict | None = None,
             what: str = "runs") -> dict[str, str]:
    """The runs in `todo` (of `runs`, default the study's) as one Tune grid of Ray Train runs; -> {label: error}
    of the runs that failed."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.common import init_ray, tune_verbosity
    from pipelines.tracking import use_store
    from pipelines.trials import TrialContext, root_cause, trial_resources, trial_runs_callback, trial_trainable

    runs = plan["runs"] if runs is None else runs
    storage = storage_of(args)
    ray = init_ray(args.address)
    concurrent, cpus_per_worker, gpus_per_worker = trial_resources(
        ray, 1, 1 if args.use_gpu else 0, args.max_concurrent)
    context = TrialContext(
        base_config=plan["base"], data=str(Path(args.data).resolve()), runs={label: runs[label] for label in todo},
        parent_run_id=parent_run_id, mlflow_uri=uri, experiment_id=use_store(uri).experiment_id,
        storage=str(storage), cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
        proxy={"every": plan["every"], "num_samples": args.eval_samples, "heun_steps": args.eval_heun_steps,
               "extractor": plan["extractor"], "reference": plan["judge_dir"]})
    steps = runs[todo[0]].get("steps", plan["steps"])
    print(f"study {plan['name']}: {len(todo)} {what} of {steps} steps ({steps * plan['base'].optim.batch_size} images), "
          f"{concurrent} at a time with {cpus_per_worker} CPU(s) each", flush=True)
    tuner = tune.Tuner(
        trial_trainable(context),
        param_space={"run": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=concurrent)),
        # a new Tune experiment per invocation; the Train runs inside keep their names and so their checkpoints
        run_config=tune.RunConfig(name=f"study-{plan['name']}-{what}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(storage), verbose=tune_verbosity(),
                                  callbacks=[trial_runs_callback(context)],
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    errors = {}
    for result in tuner.fit():
        label = (result.config or {}).get("run")
        if label is not None and result.error:
            errors[label] = root_cause(result.error)
    return errors


def evaluated_steps(client, plan: dict) -> dict[str, tuple[str | None, list[int]]]:
    """{label: (MLflow run id or None, steps evaluated)}: what each run has done, from its own history, so a
    killed study loses nothing and a rerun knows which runs are finished."""
    from pipelines.tracking import EXPERIMENT
    experiment = client.get_experiment_by_name(EXPERIMENT)
    key = f"proxy_fid_{plan['extractor']}"
    done = {}
    for label, run in plan["runs"].items():
        found = client.search_runs([experiment.experiment_id], tag_query({"sddit.train_name": run["name"]})) \
            if experiment else []
        run_id = found[0].info.run_id if found else None
        done[label] = (run_id, sorted(m.step for m in client.get_metric_history(run_id, key)) if run_id else [])
    return done


def outcomes_of(done: dict, plan: dict, errors: dict[str, str], storage: Path) -> dict[str, dict]:
    """Completed: the last evaluation is logged and the last checkpoint written. A run killed between the two
    (its last step logs first) holds an older checkpoint and is not complete: a rerun trains its last steps
    again from there, so the final model is not lost. A run whose checkpoints were all deleted counts by its
    evaluations alone."""
    outcomes = {}
    for label, (_, steps) in done.items():
        last = max(steps, default=0)
        checkpoint = last_checkpoint(storage, plan["runs"][label]["name"]) if last >= plan["steps"] else None
        if last >= plan["steps"] and checkpoint and checkpoint[1] < plan["steps"]:
            outcomes[label] = {"status": "incomplete", "last_step": checkpoint[1],
                               "note": f"evaluated at step {last}, but its last checkpoint is step {checkpoint[1]}"}
        elif last >= plan["steps"]:
            outcomes[label] = {"status": "completed", "last_step": last}
        elif label in errors:
            outcomes[label] = {"status": "error", "error": errors[label], "last_step": last}
        else:
            outcomes[label] = {"status": "incomplete", "last_step": last}
    return outcomes


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def check_same_judge(plan: dict, params: dict) -> None:
    """A continued study must score its new runs with the judge that scored its first ones: two domain judges
    trained on the same held-out images in another shard order put the same samples at FID 23.0 and 36.3."""
    recorded = params.get("judge.weights_sha256")
    current = plan["judge"].get("weights_sha256")
    if recorded and current and recorded != current:
        raise ConfigError("reference", f"study {plan['name']!r} was scored by a judge with weights sha256 "
                                       f"{recorded[:12]}..., the reference dataset's judge is now {current[:12]}... "
                                       f"(re-encoded or changed?); FIDs would not be comparable: use another --name")


def study(args) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import PARENT_ENV, tracking_uri, use_store
    from pipelines.trials import prepare_judge

    set_verbose(args.verbose)
    plan = plan_study(args)                        # everything that can be wrong fails here, before Ray
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(args.run_dir)
    use_store(uri)
    client = MlflowClient(uri)
    plan["judge"] = prepare_judge(plan["extractor"], plan["judge_dir"])
    existing = mlflow.search_runs(filter_string=tag_query({"sddit.study_name": plan["name"]}), output_format="list")
    if existing:
        check_same_judge(plan, existing[0].data.params)
        parent_run_id = existing[0].info.run_id
    else:
        parent = os.environ.get(PARENT_ENV) or None
        with mlflow.start_run(run_name=f"study {plan['name']}", parent_run_id=parent, nested=parent is not None,
                              tags={"sddit.stage": "study", "sddit.study_name": plan["name"]}) as run:
            mlflow.log_params({"arms": ",".join(plan["arms"]), "seeds": args.seeds, "images_per_arm": plan["images"],
                               "steps": plan["steps"], "eval_every_steps": plan["every"],
                               "eval_samples": args.eval_samples, "eval_heun_steps": args.eval_heun_steps,
                               "preset": plan["preset"], "overrides": " ".join(args.overrides)[:500],
                               "data": str(Path(args.data).resolve()),
                               "reference": plan["judge_dir"],
                               **{f"judge.{key}": value for key, value in plan["judge"].items()}})
            parent_run_id = run.info.run_id
    # seed by seed (every arm's seed 0 first): a study stopped part-way has each arm at the same number of seeds
    storage = storage_of(args)
    todo = sorted((label for label, o in outcomes_of(evaluated_steps(client, plan), plan, {}, storage).items()
                   if o["status"] != "completed"), key=lambda label: plan["runs"][label]["seed"])
    if args.report_only:
        print(f"study {plan['name']}: --report-only: {len(todo)} unfinished runs left as they are", flush=True)
        todo = []
    pretrain_errors = pretrain_transfer_arms(args, plan, todo, parent_run_id, uri)
    todo = [label for label in todo if label not in pretrain_errors]
    errors = run_grid(args, plan, todo, parent_run_id, uri) if todo else {}
    errors.update(pretrain_errors)
    if not todo and not args.report_only:
        print(f"study {plan['name']}: all {len(plan['runs'])} runs already finished; rewriting the report", flush=True)
    done = evaluated_steps(client, plan)
    outcomes = outcomes_of(done, plan, errors, storage)
    (out / "outcomes.json").write_text(json.dumps(outcomes, indent=2))
    summary = report(args, plan, client, done, parent_run_id, outcomes, out)
    failed = [label for label, o in outcomes.items() if o["status"] != "completed"]
    print(f"study {plan['name']}: {len(plan['runs']) - len(failed)} of {len(plan['runs'])} runs finished"
          + (f"; not finished: {', '.join(failed)}" if failed else "") + f"; report: {out / 'summary.md'}", flush=True)
    return summary


def pretrain_transfer_arms(args, plan: dict, todo: list[str], parent_run_id: str, uri: str) -> dict[str, str]:
    """Run the pre-training of every unfinished transfer run first (a grid of its own, finished ones kept), then
    point each transfer run at its checkpoint; -> {label: error} of the transfer runs that cannot start."""
    storage = storage_of(args)
    needed = {plan["runs"][label]["pretrain"] for label in todo if "pretrain" in plan["runs"][label]}
    found = {label: final_checkpoint(storage, plan["pretrain_runs"][label]) for label in needed}
    pending = sorted(label for label, checkpoint in found.items() if checkpoint is None)
    failed = run_grid(args, plan, pending, parent_run_id, uri, plan["pretrain_runs"], "pre-training runs") \
        if pending else {}
    found.update({label: final_checkpoint(storage, plan["pretrain_runs"][label]) for label in pending})
    errors = {}
    for label in todo:
        run = plan["runs"][label]
        if "pretrain" in run:
            checkpoint = found[run["pretrain"]]
            if checkpoint is None:
                errors[label] = f"its pre-training did not finish: {failed.get(run['pretrain'], 'no final checkpoint')}"
            else:
                run["init_from"] = str(checkpoint)
    return errors


def main(argv=None):
    return study(parse_args(argv))


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("study", main)


if __name__ == "__main__":
    cli()
