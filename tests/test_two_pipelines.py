"""Two of our commands started at the same moment on one machine, each without --address, so each starts a
local Ray runtime of its own beside the other's (docs/troubleshooting.md, "Two commands at once")."""
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fixtures import TINY, encode_pixels

ROOT = Path(__file__).resolve().parents[1]


def test_a_sweep_and_a_training_started_together_both_finish_without_a_traceback(ray_session, image_tree, tmp_path):
    import mlflow

    data = encode_pixels(image_tree[0], tmp_path / "pixel8", 8)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "grid", "values": [3e-3, 1e-3]}}))
    commands = {
        "train": [str(ROOT / "pipelines" / "train.py"), "--data", str(data), "--preset", str(preset),
                  "--num-workers", "1", "--name", "beside-a-sweep", "--run-dir", str(tmp_path / "train-runs")],
        "sweep": [str(ROOT / "tuning" / "sweep.py"), "--data", str(data), "--preset", str(preset), "--space", str(space),
                  "--search", "grid", "--num-samples", "1", "--budget-steps", "4", "--proxy-samples", "16",
                  "--max-concurrent", "1", "--name", "beside-a-training", "--run-dir", str(tmp_path / "sweep-runs")],
    }
    started = {stage: subprocess.Popen([sys.executable, *command], cwd=tmp_path, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for stage, command in commands.items()}
    consoles = {stage: process.communicate(timeout=900)[0] for stage, process in started.items()}
    for stage, process in started.items():
        assert process.returncode == 0, consoles[stage][-4000:]
        assert "Traceback" not in consoles[stage], consoles[stage][-4000:]
    assert "finished at step 8" in consoles["train"] and "tune: best proxy_fid_domain" in consoles["sweep"]
    # each wrote its own runs into its own store
    for stage, tag in (("train", "sddit.train_name"), ("sweep", "sddit.sweep_name")):
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / f'{stage}-runs' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("sddit")
        runs = [run for run in client.search_runs([experiment.experiment_id]) if tag in run.data.tags]
        assert runs and all(run.info.status == "FINISHED" for run in runs), stage
