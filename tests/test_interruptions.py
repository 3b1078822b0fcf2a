"""kill -9 of full_run during each stage, then the same command again: it completes, reusing what was done,
and MLflow holds one pipeline run with each stage listed once."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_full_run import SMOKE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def full_run(run_dir: Path, kill_during: str | None = None, after_s: float = 0.0) -> tuple[int, str]:
    """Run the pipeline; with `kill_during`, SIGKILL its whole process group `after_s` seconds into that stage."""
    command = [sys.executable, "-u", str(ROOT / "pipelines/full_run.py"), "--run-dir", str(run_dir), *SMOKE]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if kill_during and line.startswith(f"full_run: {kill_during} started"):
                time.sleep(after_s)
                os.killpg(process.pid, signal.SIGKILL)
                break
        process.wait(timeout=900)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, "".join(output)


def test_full_run_killed_in_every_stage_completes_as_one_pipeline_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    run_dir = tmp_path / "runs"
    for stage, after_s in (("encode", 1.0), ("tune", 8.0), ("train", 4.0), ("evaluate", 4.0)):
        code, output = full_run(run_dir, stage, after_s)
        assert code == -signal.SIGKILL, f"the run ended before it could be killed in {stage}:\n{output[-3000:]}"
    code, output = full_run(run_dir)
    assert code == 0, output[-3000:]
    assert "full_run: continuing the interrupted pipeline run" in output
    assert (run_dir / "demo_summary.json").is_file()

    client = MlflowClient(tracking_uri(run_dir))
    experiment = client.get_experiment_by_name("sddit")
    pipelines = client.search_runs([experiment.experiment_id], "tags.`sddit.stage` = 'pipeline'")
    assert len(pipelines) == 1 and pipelines[0].info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{pipelines[0].info.run_id}'")
    assert sorted(child.data.tags["sddit.stage"] for child in children) == [
        "encode", "evaluate", "evaluate", "evaluate", "train", "tune"]
    assert "metrics_cfg1.fid_domain" in pipelines[0].data.metrics
