"""kill -9 of full_run in each stage in turn, then the same command again: it completes, reuses what was
finished, and MLflow holds one pipeline run that lists each stage once."""
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# small budgets, with a progress line in the final training (step 50 of 60) to kill it at
BUDGETS = ["--sweep-samples", "2", "--sweep-budget", "8", "--train-steps", "60", "--eval-samples", "30",
           "--eval-steps", "4"]
# the line of each stage after which the kill lands: the stage has started real work but not finished it
KILL_AT = {
    "encode": "encode: 1797 images in 10 classes",
    "tune": "sweep-demo-",                  # a trial's first progress line
    "train": "final-demo: step 50/",
    "evaluate": "evaluate: fid_domain",     # the first of the three evaluations is done, the second is not
}


def clean_env() -> dict:
    """This process's environment without what earlier tests exported (a tracking URI, a parent run)."""
    from pipelines.tracking import PARENT_ENV
    return {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", PARENT_ENV)}


def run_until(command: list[str], marker: str, timeout: float = 600) -> str:
    """Start `command` in its own process group and kill -9 the whole group once `marker` appears in its
    output; returns the output up to then. The run must not finish first."""
    process = subprocess.Popen(command, cwd=ROOT, env=clean_env(), start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, deadline = [], time.time() + timeout
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    try:
        while time.time() < deadline:
            if not selector.select(timeout=1):
                continue
            line = process.stdout.readline()
            if not line:
                break                                   # the run ended before the marker
            output.append(line)
            if marker in line:
                return "".join(output)
        pytest.fail(f"{marker!r} never appeared (exit {process.poll()}):\n" + "".join(output)[-4000:])
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()


def test_killed_in_each_stage_then_rerun_completes_with_one_pipeline_run(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs"
    command = [sys.executable, str(ROOT / "pipelines" / "full_run.py"), "--run-dir", str(run_dir)] + BUDGETS
    outputs = {stage: run_until(command, marker) for stage, marker in KILL_AT.items()}
    # each rerun after the first says which pipeline run it continues
    assert all("continuing the interrupted pipeline run" in outputs[stage] for stage in ("tune", "train", "evaluate"))
    # the rerun killed in training first finished the interrupted sweep; the one after it found the sweep done
    assert "tune: best" in outputs["train"] and "sweep-demo-" not in outputs["evaluate"]

    done = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "continuing the interrupted pipeline run" in done.stdout
    for finished_before in ("sweep-demo-", "final-demo: step"):      # neither the sweep nor the training again
        assert finished_before not in done.stdout + done.stderr
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    assert Path(summary["checkpoint"]).is_dir() and summary["metrics_cfg1"]["fid_domain"] > 0

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sddit")
    [pipeline] = client.search_runs([experiment.experiment_id], "tags.`sddit.stage` = 'pipeline'")
    assert pipeline.info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}'")
    assert sorted(child.data.tags["sddit.stage"] for child in children) == [
        "encode", "evaluate", "evaluate", "evaluate", "train", "tune"]
    assert "metrics_cfg1.fid_domain" in pipeline.data.metrics
