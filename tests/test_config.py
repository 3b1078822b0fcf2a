import os
import subprocess
import sys
from pathlib import Path

import pytest

from sddit.config import Config, apply_overrides, config_from_dict, load_preset, preset_names, save_config
from sddit.errors import ConfigError
from sddit.models import build_from_config


def test_presets_load_and_have_the_paper_recipe():
    assert {"demo", "imagenet256-S2", "imagenet256-B2", "imagenet256-XL2"} <= set(preset_names())
    expected_steps = {"imagenet256-S2": 400_000, "imagenet256-B2": 400_000, "imagenet256-XL2": 2_400_000}
    for name, steps in expected_steps.items():
        cfg = load_preset(name)
        assert cfg.model.name == "SD-DiT-" + name.split("-")[1][:-1] + "/2"
        assert cfg.train.steps == steps and cfg.optim.batch_size == 256
        assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0
        assert cfg.model.mask_ratio == 0.2 and cfg.disc.student_temp == 0.1
        assert (cfg.disc.teacher_temp_start, cfg.disc.teacher_temp_end) == (0.09, 0.099)
        assert (cfg.ema.teacher_momentum_start, cfg.ema.teacher_momentum_end) == (0.996, 0.999)
        assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes) == (32, 4, 1000)


def test_demo_preset_is_tiny_and_pixel_space():
    cfg = load_preset("demo")
    assert cfg.data.codec == "pixel" and cfg.model.in_channels == 3 and cfg.model.num_classes == 10
    assert sum(p.numel() for p in build_from_config(cfg.model).student_parameters()) < 5e6


@pytest.mark.parametrize("section,key,value,field", [
    ("model", "mask_ratio", 1.0, "model.mask_ratio"),
    ("model", "mask_ratio", "lots", "model.mask_ratio"),
    ("model", "name", "SD-DiT-XXL/2", "model.name"),
    ("diffusion", "teacher_sigma", 0.0, "diffusion.teacher_sigma"),
    ("diffusion", "p_std", -1.0, "diffusion.p_std"),
    ("disc", "student_temp", 0.0, "disc.student_temp"),
    ("disc", "teacher_temp_end", -0.1, "disc.teacher_temp_end"),
    ("ema", "generation_decay", 1.0, "ema.generation_decay"),
    ("optim", "precision", "fp8", "optim.precision"),
    ("optim", "lr", 0, "optim.lr"),
    ("train", "steps", 0, "train.steps"),
    ("train", "sample_count", -1, "train.sample_count"),
    ("data", "codec", "jpeg", "data.codec"),
    ("optim", "momentum", 0.9, "optim.momentum"),
])
def test_bad_values_name_their_field(section, key, value, field):
    with pytest.raises(ConfigError) as info:
        config_from_dict({section: {key: value}})
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_unknown_section_and_preset():
    with pytest.raises(ConfigError, match="^trainer"):
        config_from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*demo"):
        load_preset("nope")


def test_overrides_and_yaml_round_trip(tmp_path):
    cfg = apply_overrides(load_preset("demo"), ["model.mask_ratio=0.5", "optim.lr=3e-4", "diffusion.teacher_sigma=0.1",
                                                "optim.betas=0.9,0.95"])
    assert cfg.model.mask_ratio == 0.5 and cfg.optim.lr == 3e-4 and cfg.diffusion.teacher_sigma == 0.1
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.hidden_size == 128                    # the preset's other overrides survive
    path = tmp_path / "best.yaml"
    save_config(cfg, path)
    assert load_preset(path) == cfg
    with pytest.raises(ConfigError, match="^model.mask_ratio"):
        apply_overrides(cfg, ["model.mask_ratio=2"])
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        apply_overrides(cfg, ["mask_ratio=0.1"])
    assert cfg.flat()["model.mask_ratio"] == 0.5


def test_default_config_is_valid():
    assert Config().validate().model.name == "SD-DiT-S/2"


def test_library_imports_without_ray():
    code = ("import sys, sddit.config, sddit.models, sddit.diffusion, sddit.objective, sddit.training, "
            "sddit.schedules, sddit.discrimination; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_errors_survive_pickling_across_processes():
    import pickle
    error = pickle.loads(pickle.dumps(ConfigError("optim.lr", "must be > 0, got -1")))
    assert error.field == "optim.lr" and str(error) == "optim.lr: must be > 0, got -1"


def test_configs_and_the_pipeline_modules_import_without_torch_or_timm():
    # a Tune trial's actor unpickles its trainable from pipelines.trials and only starts a Ray Train run: importing
    # the networks there cost each trial ~2 s of CPU on the 2-core demo
    code = ("import sys, sddit.config, sddit.models, pipelines.trials, tuning.sweep, pipelines.train, pipelines.full_run; "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_every_user_error_shares_one_base_that_the_command_line_prints_as_one_line(capsys):
    import importlib
    import inspect
    import pickle

    from pipelines.common import run_cli
    from sddit.errors import UserError
    modules = ["sddit.checkpoint", "sddit.codecs", "sddit.data", "sddit.errors", "sddit.evaluation",
               "sddit.extractors", "sddit.representations", "sddit.sampling", "pipelines.demo_data"]
    errors = {obj for name in modules for _, obj in inspect.getmembers(importlib.import_module(name), inspect.isclass)
              if issubclass(obj, Exception) and obj.__module__ == name}
    assert [e.__name__ for e in errors if not issubclass(e, UserError)] == []
    assert len(errors) >= 10      # UserError, ConfigError, StorageError and one per module
    for error in errors - {UserError}:
        message = "field.x: the message"
        raised = error("field.x", "the message") if error.__name__ == "ConfigError" else error(message)
        assert str(pickle.loads(pickle.dumps(raised))) == message           # crosses Ray's process boundaries

        def main():
            raise raised
        with pytest.raises(SystemExit) as exit_:
            run_cli("stage", main)
        assert exit_.value.code == f"stage: {message}", error


@pytest.mark.parametrize("module, required, flags", [
    ("pipelines.encode", ["--data", "d", "--out", "o"], ["--address", "--run-dir", "--verbose"]),
    ("pipelines.evaluate", ["--checkpoint", "c"], ["--address", "--run-dir", "--verbose"]),
    ("pipelines.train", ["--data", "d"], ["--set", "--use-gpu", "--run-dir", "--storage", "--address", "--verbose"]),
    ("tuning.sweep", ["--data", "d"], ["--set", "--run-dir", "--storage", "--address", "--verbose"]),
    ("pipelines.study", ["--data", "d", "--out", "o", "--arms", "DiT"],
     ["--set", "--use-gpu", "--run-dir", "--storage", "--address", "--verbose"]),
    ("pipelines.full_run", [], ["--address", "--storage", "--run-dir", "--verbose"]),
])
def test_the_options_stages_share_are_defined_once(module, required, flags, capsys, monkeypatch):
    import importlib

    from pipelines.common import SHARED_OPTIONS, VERBOSE_ENV
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    parse_args = importlib.import_module(module).parse_args
    given = {"--set": ["a.b=1", "c.d=2"], "--use-gpu": [], "--run-dir": ["elsewhere"], "--storage": ["/shared/x"],
             "--address": ["auto"], "--verbose": []}
    defaults, chosen = vars(parse_args(required)), vars(parse_args(required + [a for f in flags for a in [f, *given[f]]]))
    for flag in flags:
        dest = SHARED_OPTIONS[flag].get("dest", flag.lstrip("-").replace("-", "_"))
        assert defaults[dest] == SHARED_OPTIONS[flag].get("default", False), (module, flag)
        assert chosen[dest] == (given[flag] if flag == "--set" else given[flag][0] if given[flag] else True)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "options the stages share:" in capsys.readouterr().out
    # parsing only parses: --verbose takes effect when the stage runs (a Python caller's options too)
    assert VERBOSE_ENV not in os.environ        # restored after the test in any case (monkeypatch)


@pytest.mark.parametrize("module, options_type, required, bad_flag, bad_value", [
    ("pipelines.encode", "EncodeOptions", {"data": "d", "out": "o"}, "--resolution", "12"),
    ("pipelines.evaluate", "EvaluateOptions", {"checkpoint": "c"}, "--guidance-interval", "5,1"),
    ("pipelines.train", "TrainOptions", {"data": "d"}, "--num-workers", "0"),
    ("tuning.sweep", "SweepOptions", {"data": "d"}, "--budget-steps", "0"),
])
def test_stage_options_are_typed_and_checked_once_for_the_command_line_and_python_callers(
        module, options_type, required, bad_flag, bad_value, capsys):
    """A stage's entry point takes its options as a dataclass: the command line's defaults are the dataclass's
    (full_run builds them in Python), and a value out of range is refused by the same check from both."""
    import importlib

    stage = importlib.import_module(module)
    options_type = getattr(stage, options_type)
    argv = [a for key, value in required.items() for a in (f"--{key}", value)]
    parsed = stage.parse_args(argv)
    assert type(parsed) is options_type and parsed == options_type(**required)
    with pytest.raises(SystemExit) as exit_:
        stage.parse_args(argv + [bad_flag, bad_value])
    assert exit_.value.code == 2 and f"{bad_flag}: " in capsys.readouterr().err
    field = bad_flag.lstrip("-").replace("-", "_")
    value = type(getattr(parsed, field) if getattr(parsed, field) is not None else "")(bad_value)
    with pytest.raises(ConfigError, match=f"^{bad_flag}: "):
        options_type(**required, **{field: value})


def test_a_stage_cannot_give_its_own_help_to_a_shared_option_it_does_not_have():
    from pipelines.common import shared_options
    with pytest.raises(TypeError, match="use_gpu"):
        shared_options("--run-dir", use_gpu="one GPU per run")
