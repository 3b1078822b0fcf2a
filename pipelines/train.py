"""Stage 2, train: data-parallel SD-DiT training on Ray Train, resumable and fault tolerant.

    python pipelines/train.py --data /shared/latents/in256 --preset imagenet256-XL2 --num-workers 8 --use-gpu

The loop itself is `sddit.training.train_loop`; this file only runs it on Ray Train workers
(DDP: NCCL on GPUs, gloo on CPUs) and connects it to checkpoint storage and MLflow.
Re-running the same command (same --name and --storage) continues from the latest checkpoint;
a worker that dies is restarted from it (--max-failures).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sddit.config import Config, apply_overrides, load_preset, preset_names
from sddit.data import Manifest
from sddit.errors import ConfigError
from sddit.models.registry import registry_fields
from pipelines.common import (parse_options, quiet_exit_in_finalizers, require_at_least, run_cli, set_verbose,
                              shared_options, warn_about_layout)
from pipelines.tracking import tag_query

# Test hook, read by the driver and passed to the workers: "RANK:STEP:MARKER" makes that rank's
# process exit at its first log at or after STEP, once (the marker file records it), like a crash.
KILL_ENV = "SDDIT_FAULT_KILL_WORKER"


@dataclass
class TrainOptions:
    """What one training does (the command line's flags, typed; checked here for every caller). None: the
    preset's value."""
    data: str
    preset: str = "demo"
    model: str | None = None
    num_workers: int = 2
    cpus_per_worker: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    init_from: str | None = None
    name: str | None = None
    max_failures: int = 3
    overrides: list[str] = field(default_factory=list)
    use_gpu: bool = False
    run_dir: str = "runs"
    storage: str | None = None
    address: str | None = None
    verbose: bool = False

    def __post_init__(self):
        require_at_least(self, num_workers=1, cpus_per_worker=1, max_failures=0)


@dataclass
class WorkerContext:
    """What each Ray Train worker of a training gets, besides its rank (train_loop_config={"context": ...})."""
    config: Config
    data: str                           # the dataset's absolute path
    mlflow_uri: str
    mlflow_run: dict                    # find_or_create_run's arguments: rank 0 finds or creates the run
    cpus_per_worker: float
    name: str = "train"
    init_from: str | None = None
    kill: str | None = None             # KILL_ENV's value (a test's injected crash)
    proxy: dict | None = None           # a trial's proxy evaluation: every, num_samples, heun_steps, extractor[, reference]
    verbose: bool = False


def parse_args(argv=None) -> TrainOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared_options("--set", "--use-gpu", "--run-dir", "--storage", "--address", "--verbose")])
    parser.add_argument("--data", required=True, help="dataset directory written by pipelines/encode.py")
    parser.add_argument("--preset", default="demo", help=f"preset name ({', '.join(preset_names())}) or YAML path")
    parser.add_argument("--model", default=None,
                        help="a registry model instead of the preset's, e.g. DiT-S/2: its size, patch and family "
                             "(mask, decoder, discrimination); the preset keeps the data fields and the head "
                             "(default: the preset's model)")
    parser.add_argument("--num-workers", type=int, default=2, help="data-parallel workers (default 2)")
    parser.add_argument("--cpus-per-worker", type=int, default=None,
                        help="CPUs (and torch threads) per worker (default on CPU runs: the largest even share "
                             "that fits all workers on the cluster's nodes; 4 with --use-gpu)")
    parser.add_argument("--steps", type=int, default=None, help="total optimiser steps (train.steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size across workers (optim.batch_size)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (train.checkpoint_every)")
    parser.add_argument("--keep-checkpoints", type=int, default=None, help="checkpoints to keep (train.keep_checkpoints)")
    parser.add_argument("--init-from", default=None, help="start from this checkpoint's weights (e.g. a sweep's best trial)")
    parser.add_argument("--name", default=None, help="run name; re-running with the same name resumes (default: from preset/model)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from (default 3)")
    return parse_options(parser, TrainOptions, argv)


def resolve_config(args):
    """The full config, checked against the dataset before any worker starts."""
    from sddit.checkpoint import load_checkpoint
    from sddit.training import fit_to_dataset
    config = load_preset(args.preset)
    overrides = []
    if args.model:       # the registry's architecture and family switches (an unknown name fails), then --set
        overrides += [f"model.name={args.model}",
                      *(f"model.{key}={value}" for key, value in registry_fields(args.model).items())]
    overrides += args.overrides
    for flag, field in ((args.steps, "train.steps"), (args.batch_size, "optim.batch_size"),
                        (args.checkpoint_every, "train.checkpoint_every"), (args.keep_checkpoints, "train.keep_checkpoints")):
        if flag is not None:
            overrides.append(f"{field}={flag}")
    config = apply_overrides(config, overrides)
    manifest = Manifest.read(args.data)
    manifest.check_shards(args.data)
    warn_about_layout("train", manifest, args.data)
    config = fit_to_dataset(config, manifest, args.data)
    if config.optim.batch_size % args.num_workers:
        raise ConfigError("optim.batch_size", f"{config.optim.batch_size} is not divisible by {args.num_workers} workers")
    if args.init_from:
        load_checkpoint(args.init_from)        # unreadable: one line naming the file here, not a worker's traceback
    return config


# ---------------------------------------------------------------------------------------------
# On each worker
# ---------------------------------------------------------------------------------------------

def progress_line(name: str, step: int, total_steps: int, batch_size: int, metrics: dict) -> str:
    """'train: step 750/1000, 21 img/s, loss 0.1465, fid_domain 63.5, ~13 min of steps left': the time left
    is the remaining steps at the last window's rate, evaluations and checkpoints not counted."""
    rate = metrics.get("images_per_s", 0)
    shown = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"             # a 512 px model on a CPU: 0.4 img/s
    line = f"{name}: step {step}/{total_steps}, {shown} img/s, loss {metrics.get('loss', float('nan')):.4g}"
    line += "".join(f", {k[len('proxy_'):]} {v:.4g}" for k, v in metrics.items() if k.startswith("proxy_fid"))
    if rate > 0 and step < total_steps:
        minutes = (total_steps - step) * batch_size / rate / 60
        line += f", ~{minutes:.0f} min of steps left" if minutes >= 1 else ", under a minute of steps left"
    return line


class RayHooks:
    """Rank 0 logs to MLflow (one run, continued across restarts); every rank reports to Ray Train.
    `mlflow_run` holds find_or_create_run's arguments after the client: rank 0 finds or creates the run."""

    def __init__(self, rank: int, mlflow_uri: str, mlflow_run: dict, dataset: dict, kill: str | None = None,
                 proxy: dict | None = None, name: str = "train", total_steps: int = 0, batch_size: int = 1):
        self.rank, self.dataset, self.kill, self.proxy = rank, dataset, kill, proxy
        self.name, self.total_steps, self.batch_size = name, total_steps, batch_size
        self.client, self.run_id, self.last_logged, self.codec, self._judge = None, None, -1, None, None
        if rank == 0:
            from mlflow.tracking import MlflowClient
            self.client = MlflowClient(mlflow_uri)
            self.run_id = find_or_create_run(self.client, **mlflow_run)
            history = self.client.get_metric_history(self.run_id, "loss")
            self.last_logged = max((m.step for m in history), default=-1)   # after a restart: no duplicate steps

    def log(self, step, metrics, checkpoint_follows=False):
        import ray.train
        maybe_kill(self.kill, self.rank, step)
        if self.client is not None and step > self.last_logged:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        if self.rank == 0:                  # the console's progress line (Ray Train's own lines need --verbose)
            # written, not print()ed: Ray Train patches print() into its logger, which shows each line twice
            sys.stdout.write(progress_line(self.name, step, self.total_steps, self.batch_size, metrics) + "\n")
            sys.stdout.flush()
        # a step that is also checkpointed reports its metrics once, with the checkpoint: a separate report
        # first would let Tune stop the trial (e.g. at its last step) before the checkpoint is saved
        if not checkpoint_follows:
            ray.train.report({**metrics, "step": step})

    def samples(self, step, latents):
        import torch

        from sddit.images import grid_image
        codec = self._codec()
        if codec is not None and step > self.last_logged:
            # decoded 8 at a time: 64 SD-VAE decodes at 512 px at once hold ~9 GB per activation
            images = torch.cat([codec.decode(chunk) for chunk in latents.cpu().split(8)])
            self.client.log_image(self.run_id, grid_image(images, nrow=8), key="samples", step=step)

    def evaluate(self, step, ema):
        """The sweep's proxy metric at every log step (a Tune scheduler needs it in every result), and a
        study's evaluation points: FID and friends of generated samples (CFG 1) against the dataset, or
        against the held-out dataset in proxy["reference"]."""
        if not self.proxy:
            return {}
        from sddit.evaluation import compute_metrics
        from sddit.reference import load_reference, make_extractor
        from sddit.sampling import SamplingPlan, sample_batch
        device = next(ema.parameters()).device
        if self._judge is None:
            # the judge and its reference statistics: the training dataset's, or a held-out dataset's
            codec = self._codec()
            judge_dir = self.proxy.get("reference") or self.dataset["dir"]
            judge_codec = codec if judge_dir == self.dataset["dir"] else None   # None: the held-out set's own
            extractor = make_extractor(self.proxy["extractor"], dataset_dir=judge_dir, codec=judge_codec,
                                       inception_weights=os.environ.get("SDDIT_INCEPTION_WEIGHTS"), device=device)
            self._judge = (codec, extractor, load_reference(None, extractor, dataset_dir=judge_dir,
                                                            codec=judge_codec, device=device))
        codec, extractor, reference = self._judge
        n = self.proxy["num_samples"]
        plan = SamplingPlan(num_samples=n, batch_size=n, num_classes=self.dataset["num_classes"],
                            latent_shape=self.dataset["latent_shape"], steps=self.proxy["heun_steps"], cfg_scale=1.0,
                            seed=0)
        images, labels = sample_batch(ema, codec, 0, plan, device=device)
        return {f"proxy_{key}": value for key, value in compute_metrics(extractor, images, reference, labels).items()}

    def checkpoint(self, step, save, metrics):
        import ray.train
        with tempfile.TemporaryDirectory() as directory:
            if self.rank == 0:
                save(directory)
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)

    def finished(self, step, metrics):
        import ray.train
        ray.train.report({**metrics, "step": step})

    def _codec(self):
        """The dataset's codec for decoding sample grids; the SD VAE is loaded on first use only."""
        if self.codec is None:
            from sddit.codecs import CodecError, make_codec
            try:
                self.codec = make_codec(self.dataset["codec"], self.dataset["vae"] or "")
            except CodecError as error:
                print(f"train: sample grids disabled: {error}", flush=True)
                self.codec = False
        return self.codec or None


def quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every report at INFO ("Reporting training result N: ...", the whole metrics dict)
    through a logger named after its module's file, outside the `ray.train` hierarchy that its
    LoggingConfig governs; raise that logger's level (the lines stay in Ray's log files with --verbose)."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:                     # another Ray layout: nothing to quieten
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def maybe_kill(spec: str | None, rank: int, step: int) -> None:
    if spec:
        kill_rank, kill_step, marker = spec.split(":", 2)
        if rank == int(kill_rank) and step >= int(kill_step) and not Path(marker).exists():
            Path(marker).write_text(f"killed rank {rank} at step {step}\n")
            os._exit(1)


def train_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from sddit.checkpoint import load_checkpoint
    from sddit.training import dataset_info, train_loop

    import torch
    context: WorkerContext = loop_config["context"]
    quiet_exit_in_finalizers()
    # Ray sets OMP_NUM_THREADS=1; use the CPUs reserved (a fractional share still runs one thread)
    torch.set_num_threads(max(1, int(context.cpus_per_worker)))
    if not context.verbose:
        quiet_ray_train_reports()
    world = ray.train.get_context()
    rank, world_size = world.get_world_rank(), world.get_world_size()
    config = context.config
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = load_checkpoint(directory)
    init_from = load_checkpoint(context.init_from) if context.init_from and resume is None else None
    hooks = RayHooks(rank, context.mlflow_uri, context.mlflow_run,
                     dataset_info(Manifest.read(context.data), context.data), context.kill,
                     context.proxy, context.name, config.train.steps, config.optim.batch_size)
    train_loop(config, context.data, device=ray.train.torch.get_device(), rank=rank, world_size=world_size,
               hooks=hooks, wrap_model=ray.train.torch.prepare_model if world_size > 1 else None,
               resume=resume, init_from=init_from)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

CODE_VERSION_TAG = "sddit.code_version"


def find_or_create_run(client, experiment_id: str, name: str, params: dict, parent_run_id: str | None = None) -> str:
    """The id of training `name`'s MLflow run: the run of an earlier start of the same name, so metrics
    continue, or a new one (a child of `parent_run_id` when given). Called by the driver of a training and
    by rank 0 of a sweep's or study's trial, so a trial's own process never loads MLflow."""
    from mlflow.entities import Param

    from sddit import code_version

    # the code each (re)start ran, in order: a run resumed by other code says so
    version = code_version()
    existing = client.search_runs([experiment_id], tag_query({"sddit.train_name": name}), max_results=1,
                                  order_by=["attributes.start_time DESC"])
    if existing:
        run_id, earlier = existing[0].info.run_id, existing[0].data.tags.get(CODE_VERSION_TAG, "")
        if version not in earlier.split(", "):
            client.set_tag(run_id, CODE_VERSION_TAG, f"{earlier}, {version}" if earlier else version)
        client.update_run(run_id, status="RUNNING")         # it runs again; its driver ends it
        return run_id
    tags = {"sddit.stage": "train", "sddit.train_name": name, CODE_VERSION_TAG: version}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, run_name=f"train {name}", tags=tags).info.run_id
    params = [Param(key, str(value)[:500]) for key, value in params.items()]
    for start in range(0, len(params), 100):                # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])
    return run_id


def train(args: TrainOptions):
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from pipelines.common import cpus_per_worker as fitting_cpus, init_ray, torch_trainer, train_logging, verbose
    from pipelines.tracking import PARENT_ENV, tracking_uri, use_store

    set_verbose(args.verbose)
    config = resolve_config(args)                           # fails here, before any cluster work
    name = args.name or f"{Path(args.preset).stem}-{config.model.name.replace('/', '')}"
    storage = Path(args.storage or Path(args.run_dir) / "ray").resolve()
    uri = tracking_uri(args.run_dir)
    experiment = use_store(uri)
    params = {**config.flat(), "data": str(Path(args.data).resolve()), "num_workers": args.num_workers,
              "use_gpu": args.use_gpu, "init_from": args.init_from, "storage": str(storage)}
    ray = init_ray(args.address)
    cpus_per_worker = args.cpus_per_worker or (4 if args.use_gpu else fitting_cpus(ray, args.num_workers))
    mlflow_run = {"experiment_id": experiment.experiment_id, "name": name, "params": params,
                  "parent_run_id": os.environ.get(PARENT_ENV) or None}
    run_id = find_or_create_run(mlflow.MlflowClient(uri), **mlflow_run)   # the workers' rank 0 finds this one
    # nested when a pipeline's parent run is active in this process
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as run:
        trainer = torch_trainer(
            train_worker,
            train_loop_config={"context": WorkerContext(
                config=config, data=str(Path(args.data).resolve()), init_from=args.init_from, mlflow_uri=uri,
                mlflow_run=mlflow_run, kill=os.environ.get(KILL_ENV), cpus_per_worker=cpus_per_worker, name=name,
                verbose=verbose())},
            scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=str(storage), logging_config=train_logging(),
                                 failure_config=FailureConfig(max_failures=args.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints)),
        )
        result = trainer.fit()
        final = result.checkpoint.path if result.checkpoint else None
        mlflow.set_tag("sddit.final_checkpoint", final)
    print(f"train: {name} finished at step {config.train.steps}; checkpoint: {final}", flush=True)
    return {"name": name, "checkpoint": final, "mlflow_run_id": run.info.run_id, "metrics": result.metrics}


def main(argv=None):
    return train(parse_args(argv))


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("train", main)


if __name__ == "__main__":
    cli()
