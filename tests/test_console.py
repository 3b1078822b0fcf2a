"""What a person sees: a default run prints our progress lines, not the libraries' INFO logs; --verbose brings them."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*command, cwd):
    done = subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def tiny_train_setup(image_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    output = run(str(ROOT / "pipelines" / "encode.py"), "--data", str(image_tree[0]), "--out", str(root / "pixel8"),
                 "--codec", "pixel", "--resolution", "8", "--run-dir", str(root / "runs"), cwd=root)
    # our lines, not Ray Data's INFO progress reports (stdout is a pipe here, as in CI and job logs)
    assert "encode: wrote" in output and "logging_progress" not in output, output
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


@pytest.mark.parametrize("verbose", [False, True])
def test_train_console_is_quiet_by_default(tiny_train_setup, verbose):
    root = tiny_train_setup
    output = run(str(ROOT / "pipelines" / "train.py"), "--data", str(root / "pixel8"), "--preset", str(root / "tiny.yaml"),
                 "--num-workers", "1", "--name", f"console-{verbose}", "--run-dir", str(root / "runs"),
                 *(["--verbose"] if verbose else []), cwd=root)
    assert "step 8/8" in output and f"console-{verbose}: step 2/8" in output   # our progress lines, either way
    assert ("Reporting training result" in output) == verbose
    assert "train: console" in output and "finished at step 8" in output
