"""Two of our commands started at the same moment on one machine, each starting a Ray runtime of its own beside
the suite's: both finish, each with its own MLflow runs, and neither console shows a traceback."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures import TINY, encode_pixels

ROOT = Path(__file__).resolve().parents[1]


def test_a_local_runtime_names_itself_to_every_process_it_starts(ray_session):
    """Ray's components that look for "the" cluster (Ray Train's placement-group cleaner, the state API) read
    RAY_ADDRESS before they auto-detect: a local runtime of ours sets it to its own GCS before it starts."""
    from pipelines.common import LOCAL_RUNTIME_ENV
    address = ray_session.get_runtime_context().gcs_address
    assert os.environ["RAY_ADDRESS"] == os.environ[LOCAL_RUNTIME_ENV] == address

    @ray_session.remote(num_cpus=0)
    def seen_by_a_worker():
        from ray.util.state import list_nodes
        return os.environ.get("RAY_ADDRESS"), len(list_nodes())

    assert ray_session.get(seen_by_a_worker.remote()) == (address, 1)


def test_an_inherited_local_runtime_is_not_a_cluster_to_join_but_a_users_address_is(monkeypatch):
    from pipelines.common import LOCAL_RUNTIME_ENV, forget_inherited_runtime
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv(LOCAL_RUNTIME_ENV, "10.0.0.1:6379")      # a parent command's runtime
    forget_inherited_runtime()
    assert "RAY_ADDRESS" not in os.environ and LOCAL_RUNTIME_ENV not in os.environ
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")      # the user's cluster (or `ray job submit`'s)
    monkeypatch.setenv(LOCAL_RUNTIME_ENV, "10.0.0.1:6379")
    forget_inherited_runtime()
    assert os.environ["RAY_ADDRESS"] == "10.0.0.2:6379" and LOCAL_RUNTIME_ENV not in os.environ


def test_a_sweep_and_a_training_started_together_both_finish(ray_session, image_tree, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    data = encode_pixels(image_tree[0], tmp_path / "pixel8", 8)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "steps": 4, "sample_every": 4}}))
    space = tmp_path / "space.yaml"
    # two trials one after the other, each reserving every CPU: the second starts only when Ray Train's
    # placement-group cleaner has freed the first's CPUs, which it failed to do beside another runtime (it looked
    # for "the" local cluster and found several), and the second trial waited for ever
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "grid", "values": [3e-3, 1e-3]}}))
    commands = {
        "sweep": ["tuning/sweep.py", "--data", str(data), "--preset", str(preset), "--space", str(space),
                  "--search", "grid", "--num-samples", "1", "--scheduler", "none", "--budget-steps", "4",
                  "--proxy-samples", "16", "--proxy-heun-steps", "2", "--max-concurrent", "1", "--name", "together",
                  "--run-dir", str(tmp_path / "sweep-runs")],
        "train": ["pipelines/train.py", "--data", str(data), "--preset", str(preset), "--num-workers", "1",
                  "--name", "together", "--run-dir", str(tmp_path / "train-runs")],
    }
    consoles = {name: tmp_path / f"{name}.console" for name in commands}
    # as from a user's shell: no MLflow store chosen (the in-process encode above exported its own); the suite's
    # runtime's RAY_ADDRESS is inherited, as a command started from a Ray worker would inherit it
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    processes = {name: subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, start_new_session=True,
                                        stdout=consoles[name].open("w"), stderr=subprocess.STDOUT)
                 for name, command in commands.items()}
    try:
        codes = {name: process.wait(timeout=400) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    outputs = {name: console.read_text() for name, console in consoles.items()}
    for name, output in outputs.items():
        assert codes[name] == 0 and "Traceback" not in output, f"{name}:\n{output[-4000:]}"
    assert "tune: best" in outputs["sweep"] and "train: together finished at step 4" in outputs["train"]

    def runs_of(run_dir, query: str) -> list:
        client = MlflowClient(tracking_uri(run_dir))
        experiment = client.get_experiment_by_name("sddit")
        assert experiment is not None, (run_dir, [e.name for e in client.search_experiments()])
        return client.search_runs([experiment.experiment_id], query)

    [sweep_run] = runs_of(tmp_path / "sweep-runs", "tags.`sddit.sweep_name` = 'together'")
    trials = runs_of(tmp_path / "sweep-runs", f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    assert sweep_run.info.status == "FINISHED" and len(trials) == 2
    assert all(trial.info.status == "FINISHED" for trial in trials)
    [train_run] = runs_of(tmp_path / "train-runs", "attributes.run_name = 'train together'")
    assert train_run.info.status == "FINISHED" and train_run.data.metrics


@pytest.mark.parametrize("quiet", [False, True])
def test_a_sigterm_during_a_finalizer_prints_no_traceback_in_our_worker_processes(quiet):
    """Ray's worker exits on SIGTERM by raising SystemExit from its handler; landing inside a finalizer, that
    printed an "Exception ignored in ..." traceback on a successful demo's console. A finalizer's real error
    is still reported."""
    code = f"""
import os, signal
from pipelines.common import quiet_exit_in_finalizers
if {quiet}:
    quiet_exit_in_finalizers()

def exit_like_ray(signum, frame):
    raise SystemExit(1)

signal.signal(signal.SIGTERM, exit_like_ray)

class TerminatedWhileCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))                        # the handler runs here, inside the finalizer

class Broken:
    def __del__(self):
        raise ValueError("a finalizer's own bug")

TerminatedWhileCollected()
Broken()
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ValueError: a finalizer's own bug" in done.stderr
    assert ("SystemExit" in done.stderr) == (not quiet), done.stderr
