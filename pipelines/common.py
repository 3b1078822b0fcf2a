"""Small helpers the Ray entry points share: starting Ray, how much the libraries say, progress reporting."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time

# Set by every stage's --verbose (and inherited by Ray's workers through the environment): the libraries'
# own INFO logs (Ray Train's per-report lines, Tune's trial tables) on the console. Either way they are
# kept in Ray's log directory (/tmp/ray/session_latest/logs).
VERBOSE_ENV = "SDDIT_VERBOSE"
# Ray folds lines from different workers that differ only in their numbers into "[repeated Nx across cluster]",
# which hides all but the first of our progress lines when several trials run (the study, the sweep). Read
# by Ray when it is first imported, which every entry point does after importing this module.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Set by init_ray when it starts a runtime of its own on this machine, to its address (inherited by Ray's workers)
LOCAL_RUNTIME_ENV = "SDDIT_LOCAL_RUNTIME"


def set_verbose(verbose: bool) -> None:
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


# The options several stages share, defined once; a stage names the ones it has (shared_options) and may give one
# a help of its own where its meaning differs (one GPU per worker in a training, per run in a study).
SHARED_OPTIONS = {
    "--run-dir": dict(default="runs", help="local root of the MLflow store (unless MLFLOW_TRACKING_URI is set) and of "
                                           "the default storage (default runs/)"),
    "--storage": dict(default=None, help="storage every node can reach, for checkpoints and Ray's results "
                                         "(default RUN_DIR/ray)"),
    "--address": dict(default=None, help="Ray address ('auto' for a running cluster; default: a local runtime)"),
    "--use-gpu": dict(action="store_true", help="one GPU per worker, NCCL (default: CPU, gloo)"),
    "--set": dict(dest="overrides", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                  help="any config field of the preset, e.g. --set model.mask_ratio=0.5 optim.lr=3e-4"),
    "--verbose": dict(action="store_true", help="show Ray's, Ray Train's and Tune's own logs and tables on the console "
                                                "(always kept in Ray's log directory)"),
}


def shared_options(*flags: str, **helps: str) -> argparse.ArgumentParser:
    """A parent parser (ArgumentParser(parents=[...])) holding these of SHARED_OPTIONS, in one help section;
    helps={'use_gpu': ...} gives a flag this stage's own help."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("options the stages share")
    for flag in flags:
        options = dict(SHARED_OPTIONS[flag])
        options["help"] = helps.pop(flag.lstrip("-").replace("-", "_"), options["help"])
        group.add_argument(flag, **options)
    if helps:
        raise TypeError(f"shared_options: no such flag among {flags}: {sorted(helps)}")
    return parent


def parse_options(parser: argparse.ArgumentParser, options_type, argv=None):
    """argv -> a stage's typed options (a dataclass whose fields are the parser's destinations). The options
    validate themselves (their __post_init__, raising ConfigError named after the flag), so a stage called from
    Python with options it built (full_run) is checked by the same code as one called from its command line;
    here a refused value ends as argparse's own errors do (usage, the message, exit status 2)."""
    from sddit.errors import ConfigError
    namespace = parser.parse_args(argv)
    try:
        options = options_type(**vars(namespace))
    except ConfigError as error:
        parser.error(str(error))
    return options


def at_least(minimum: int):
    """An argparse type: an integer >= minimum, refused as argparse refuses any bad value (usage, "argument
    --flag: must be >= 1, got 0", exit status 2), e.g. add_argument("--steps", type=at_least(1))."""
    def parse(text: str) -> int:
        value = int(text)       # a ValueError: argparse's "invalid <__name__> value: 'x'"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def require_at_least(options, **minimums) -> None:
    """Each named field of a stage's options (None: not set, skipped) is at least its minimum, or ConfigError
    named after its flag, e.g. require_at_least(self, steps=1, num_samples=2)."""
    from sddit.errors import ConfigError
    for name, minimum in minimums.items():
        value = getattr(options, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be >= {minimum}, got {value}")


def train_logging():
    """Ray Train's console log level: its per-report INFO lines and its warnings only when verbose, errors always.
    Its warnings include one with a traceback whenever its controller's resource request to the autoscaling
    coordinator (an actor that only matters to an autoscaling cluster) waits over 5 s, which a busy machine
    makes happen and which changes nothing for the run (docs/troubleshooting.md)."""
    from ray.train import LoggingConfig
    return LoggingConfig(log_level="INFO" if verbose() else "ERROR")


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (a progress report every few seconds when stdout is not a terminal) only when
    verbose; its log file in Ray's session directory keeps them, and our own progress line reports encoding."""
    import ray.data  # noqa: F401  (importing it configures the 'ray.data' logger and its console handler)
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def tune_verbosity() -> int:
    """Tune's console output: the trial tables only when verbose (our own lines report progress). Tune's
    default reporter prints its configuration box and TensorBoard hint even at verbosity 0; its legacy
    reporter, which it reads this variable for when the run starts, prints nothing at 0."""
    if verbose():
        return 1
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return 0


def local_runtime_settings() -> None:
    """What a Ray runtime started on this machine by one of our commands runs with, set in the environment
    before it starts, so that its raylet and every worker (Tune's trial actors, Train's controllers) inherit it.
    Several such runtimes can run side by side (two commands at once), so nothing in them may look for "the"
    local cluster by itself: that finds two and fails (docs/troubleshooting.md)."""
    # Ray's own components find their cluster by auto-detection unless RAY_ADDRESS names it: Ray Train's
    # placement-group cleaner, which frees the CPUs of a trial that Tune stopped, failed with "Found multiple
    # active Ray instances" beside another runtime, and the sweep's next trial waited for those CPUs for ever.
    # The address is known before the runtime starts because we choose its GCS port.
    import socket

    from ray._private.services import get_node_ip_address
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    address = f"{get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = address
    os.environ[LOCAL_RUNTIME_ENV] = address             # read by torch_trainer() here and in Tune's trial actors
    # A local runtime has no nodes that can be preempted. Ray Train's watcher for that is one more actor
    # process per Train run (each sweep trial pays for it on a small machine) and prints a core-worker
    # ERROR line about its own constructor arguments. Ray Train passes this setting on to its controllers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The Train controller polls its workers every 2 s by default, so a finished run waits up to 2 s to be
    # noticed; locally a poll is a cheap call, and the sweep's short trials each pay that wait.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Ray Train's state actor checks every 30 s, through Ray's state API, whether each run's controller is
    # still alive; a local runtime's controllers end with its driver anyway, so there is nothing for it to find.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    # Ray Train gives a worker group 60 s to start, meant for a cluster that is scaling up; a local runtime does
    # not scale, and on a busy machine (another command's training beside this one on 2 cores) starting a
    # worker process that imports torch took longer than that, failing the run instead of waiting
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    # Ray enables token authentication for a new local runtime and says so at every start: that notice
    # only with --verbose (setting RAY_AUTH_MODE here instead would come too late for this process)
    if not verbose():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def start_local_runtime(**kwargs):
    """Start a Ray runtime of this process's own on this machine (ray.init's options in kwargs), with
    local_runtime_settings; "local" so that the RAY_ADDRESS those settings name is not taken for a cluster to join."""
    import ray

    local_runtime_settings()
    ray.init(address="local", **kwargs)
    return ray


def forget_inherited_runtime() -> None:
    """The local runtime of a parent process of ours (its RAY_ADDRESS, inherited) is not a cluster for this
    process to join: without an address of its own, it starts its own runtime, as from a shell."""
    inherited = os.environ.pop(LOCAL_RUNTIME_ENV, None)
    if inherited and os.environ.get("RAY_ADDRESS") == inherited:
        del os.environ["RAY_ADDRESS"]


def init_ray(address: str | None = None, **kwargs):
    """Connect to `address` ("auto" for an existing cluster) or to the cluster RAY_ADDRESS names (as `ray job
    submit` sets it), else start a local runtime; reuse one if running."""
    import ray

    if not ray.is_initialized():
        forget_inherited_runtime()
        options = dict(log_to_driver=True, logging_level=logging.INFO if verbose() else logging.WARNING, **kwargs)
        if address is None and not os.environ.get("RAY_ADDRESS"):
            start_local_runtime(**options)
        else:
            ray.init(address=address, **options)
    return ray


def quiet_exit_in_finalizers() -> None:
    """Ray's worker processes exit on SIGTERM by raising SystemExit from a signal handler. When the signal lands
    while a finalizer runs (a WeakSet's callback during garbage collection), Python cannot raise it and prints
    it as an "Exception ignored in ..." traceback, which reaches the console of a run that succeeded. Such a
    SystemExit is dropped in this process; every other exception a finalizer raises is reported as before."""
    report = sys.unraisablehook
    if getattr(report, "drops_exit", False):
        return

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, SystemExit):
            report(unraisable)

    hook.drops_exit = True
    sys.unraisablehook = hook


def torch_trainer(*args, in_trial: bool = False, **kwargs):
    """A Ray Train TorchTrainer for our training function. Ray Train starts two helper actors for every run
    that a run here does not use: a `DatasetManager` (even with no `datasets`: our workers read their shards
    themselves) and, on a local runtime, whose processes all end with the driver, a `PlacementGroupCleaner`
    that frees a dead controller's CPUs. Each is a process importing Ray Train and Ray Data, which every sweep
    trial paid for. Inside a Tune trial (`in_trial`) the cleaner stays: a trial that Tune ends leaves its
    controller's placement group behind, and without the cleaner the sweep's next trial waits for those CPUs
    (docs/troubleshooting.md). Ray is pinned to 2.60 (pyproject.toml), whose default callbacks these are."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    local = bool(os.environ.get(LOCAL_RUNTIME_ENV))

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            unused = ((() if self.datasets else (DatasetsCallback,))
                      + ((PlacementGroupCleanerCallback,) if local and not in_trial else ()))
            return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, unused)]

    return LeanTorchTrainer(*args, **kwargs)


def warn_about_layout(stage: str, manifest, directory) -> None:
    """Say when a dataset will train badly with the streaming reader: an old shard format (slow to read) or
    class-sorted shards (a batch would hold a few classes), and what to do about it."""
    from sddit.data import FORMAT_VERSION
    from sddit.loader import SHUFFLE_WINDOW
    if manifest.format_version < FORMAT_VERSION:
        print(f"{stage}: {directory} is in shard format {manifest.format_version}, which reads ~40x slower than "
              f"format {FORMAT_VERSION}; convert it in place with `python pipelines/upgrade_dataset.py {directory}`",
              flush=True)
    if manifest.settings.order == "sorted" and len(manifest.shards) > SHUFFLE_WINDOW:
        print(f"{stage}: {directory} was encoded with class-sorted shards (before 2026-12): the reader shuffles "
              f"within {SHUFFLE_WINDOW} shards at a time, so a batch holds only a few classes; re-encode it "
              f"(pipelines/encode.py into a fresh --out) for shards that mix all classes", flush=True)


def cpus_per_worker(ray, num_workers: int) -> int:
    """The most CPUs each of `num_workers` workers can reserve so that all of them fit on the
    cluster's nodes at once. A worker cannot span nodes, so the total alone is not enough: two
    one-CPU nodes hold two one-CPU workers but not one two-CPU worker."""
    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    fitting = [cpus for cpus in range(1, max(node_cpus, default=1) + 1)
               if sum(n // cpus for n in node_cpus) >= num_workers]
    return max(fitting, default=1)


class Progress:
    """A tqdm bar on a terminal; a plain line every `every` seconds otherwise (logs, CI, ray job logs)."""

    def __init__(self, total: int, desc: str, unit: str = "img", every: float = 30.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = 0
        self.start = self.last = time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last >= self.every or self.done >= self.total:
            self.last = time.time()
            rate = self.done / max(self.last - self.start, 1e-9)
            rate = f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate} {self.unit}/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_cli(stage: str, main) -> None:
    """main(), with a user error as one line `stage: message` and exit status 1 instead of a traceback
    (an error raised in a Ray task arrives wrapped; its cause is what the user needs to read)."""
    from sddit.errors import UserError
    try:
        main()
    except (UserError, FileNotFoundError) as error:      # each names what is wrong; a Ray task's arrives wrapped
        sys.exit(f"{stage}: {getattr(error, 'cause', None) or error}")
    # The work is done and written. The interpreter's last garbage collection would walk every object torch,
    # Ray and MLflow made, seconds of a demo's exit; frozen objects are left to the operating system.
    gc.freeze()
