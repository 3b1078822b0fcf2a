import pytest
import torch

from sddit.config import Config
from sddit.models import model_config

torch.set_num_threads(2)


def tiny_config(name: str = "SD-DiT-S/2", **model_overrides) -> Config:
    """A config whose model builds and steps in milliseconds on a CPU."""
    overrides = dict(input_size=8, in_channels=2, num_classes=5, hidden_size=32, depth=2, num_heads=2,
                     decoder_depth=1, decoder_hidden_size=16, decoder_num_heads=2, head_hidden_size=32,
                     head_bottleneck_size=16, head_out_size=64)
    overrides.update(model_overrides)
    config = Config()
    config.model = model_config(name, **overrides)
    config.train.steps = 200
    config.disc.teacher_temp_warmup_steps = 10
    config.optim.lr = 1e-3
    return config.validate()


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for every test that runs a pipeline in-process, with the settings our commands
    give a local runtime (so the suite runs beside another command's runtime, as a user's would)."""
    from pipelines.common import start_local_runtime
    # the dashboard is what cleans up the Train workers of a trial that Tune stops early
    ray = start_local_runtime(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory):
    from tests.fixtures import make_image_tree
    root = tmp_path_factory.mktemp("imagenet") / "train"
    return root, make_image_tree(root)


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory):
    """A module's own MLflow store directory (the stages' --run-dir)."""
    return tmp_path_factory.mktemp("mlruns")


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    from tests.fixtures import make_tiny_vae
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")
