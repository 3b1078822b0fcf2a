"""The benchmark scripts run end to end on CPU at toy sizes and write what they promise."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sddit import code_version

ROOT = Path(__file__).resolve().parents[1]


def tiny_step_time(tmp_path, *flags) -> dict:
    """The record bench/step_time.py appends for S/8 models on 16 x 16 latents, 2 images, one timed step (in this
    process: the models are tiny, the interpreter's start-up with torch was most of a separate run's time)."""
    from bench.step_time import main as step_time
    out = tmp_path / "step_time.jsonl"
    step_time(["--size", "S/8", "--input-size", "16", "--batch-size", "2", "--steps", "1", "--warmup", "1",
               "--device", "cpu", *flags, "--out", str(out)])
    return json.loads(out.read_text().splitlines()[-1])


def test_step_time_bench_writes_a_record(tmp_path):
    record = tiny_step_time(tmp_path)
    assert [row["model"] for row in record["rows"]] == ["DiT-S/8", "MaskDiT-S/8", "SD-DiT-S/8"]
    dit, maskdit, sddit = record["rows"]
    assert 0 < dit["gflops_per_image"] < sddit["gflops_per_image"]
    assert record["sddit_over_dit_flops"] == sddit["gflops_per_image"] / dit["gflops_per_image"]
    assert all(row["loss_finite"] and row["img_per_s"] > 0 for row in record["rows"])


def test_gpu_bench_runs_on_cpu_and_writes_json_and_markdown(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--device", "cpu", "--sizes", "S/8",
                    "--families", "DiT,SD-DiT", "--batch-size", "2", "--input-size", "16", "--no-compile",
                    "--steps", "1", "--warmup", "1", "--matmul-size", "256", "--vae-batch-size", "1",
                    "--vae-resolution", "32", "--sample-model", "DiT-S/8", "--sample-batch-size", "2",
                    "--sample-steps", "2", "--out-dir", str(tmp_path)], check=True, capture_output=True)
    report = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert report["matmul_tflops"]["bf16"] > 0
    assert [row["model"] for row in report["training"]] == ["DiT-S/8", "SD-DiT-S/8"]
    assert all(0 < row["mfu"] for row in report["training"])
    assert "S/8" in report["sddit_over_dit"]
    assert report["vae_encode"]["img_per_s"] > 0
    assert [row["network_evaluations"] for row in report["sampling"]] == [6, 6]  # 2 Heun steps (3 evaluations) x CFG
    assert [row["cfg_batched"] for row in report["sampling"]] == [False, True]
    assert all(row["tflops"] > 0 for row in report["sampling"])
    assert "| SD-DiT-S/8 |" in next(tmp_path.glob("gpu-*.md")).read_text()


def test_step_time_bench_times_the_repa_term(tmp_path):
    record = tiny_step_time(tmp_path, "--repa")
    assert [row["model"] for row in record["rows"]] == ["DiT-S/8", "DiT-S/8 + REPA", "MaskDiT-S/8",
                                                        "MaskDiT-S/8 + REPA", "SD-DiT-S/8", "SD-DiT-S/8 + REPA"]
    for base, repa in zip(record["rows"][0::2], record["rows"][1::2]):
        assert repa["gflops_per_image"] > base["gflops_per_image"] and repa["student_params_m"] > base["student_params_m"]
        assert repa["activation_mib"] > base["activation_mib"] > 0 and repa["state_mib"] > base["state_mib"] > 0
    assert set(record["repa_over_plain_step_time"]) == {"DiT-S/8", "MaskDiT-S/8", "SD-DiT-S/8"}


def test_step_time_bench_times_the_self_supervision_terms_beside_dit(tmp_path):
    record = tiny_step_time(tmp_path, "--self-supervision")
    rows = {row["model"]: row for row in record["rows"]}
    assert {"DiT-S/8 + layersync", "DiT-S/8 + dispersive", "DiT-S/8 + sra"} <= set(rows)
    dit = rows["DiT-S/8"]
    for term in ("layersync", "dispersive"):            # no parameters, a few more FLOPs
        row = rows[f"DiT-S/8 + {term}"]
        assert row["student_params_m"] == dit["student_params_m"]
        assert row["gflops_per_image"] >= dit["gflops_per_image"] and row["loss_finite"]
    sra = rows["DiT-S/8 + sra"]                           # its head, and a teacher forward of the EMA's encoder
    assert sra["student_params_m"] > dit["student_params_m"] and sra["gflops_per_image"] > dit["gflops_per_image"]
    assert set(record["term_over_dit_step_time"]) == {"layersync", "dispersive", "sra"}
    mdt = rows["MDT-S/8"]                                 # a second, unmasked pass: more FLOPs per image than DiT
    assert mdt["gflops_per_image"] > dit["gflops_per_image"] and mdt["loss_finite"]
    assert record["mdt_over_dit_step_time"] == mdt["step_s"] / dit["step_s"]


def test_loader_scale_bench_measures_each_size_and_worker_count(tmp_path):
    subprocess.run([sys.executable, "bench/loader_scale.py", "--sizes", "5000", "--workers", "1,2",
                    "--unique-shards", "1", "--data-root", str(tmp_path / "data"), "--steps", "3", "--batch-size", "64",
                    "--out", str(tmp_path / "scale")], check=True, cwd=Path(__file__).resolve().parents[1])
    rows = [json.loads(line) for line in (tmp_path / "scale.jsonl").read_text().splitlines()]
    assert [(r["rows"], r["world_size"]) for r in rows] == [(5000, 1), (5000, 2)]
    assert rows[0]["epoch_share"] == 1.0 and 0.5 < rows[1]["epoch_share"] < 0.9    # rank 0 of 2 owns 2 of 3 shards
    assert all(r["peak_rss_mib"] > 0 and r["rows_per_s"] > 0 and r["rows_per_s_without_draw"] > 0
               and r["startup_bytes"] > 0 for r in rows)
    assert "| 5,000 | 2 |" in (tmp_path / "scale.md").read_text()


def test_activation_memory_counts_the_distinct_tensors_kept_for_backward_without_parameters():
    import torch
    from bench.step_time import count_flops_and_activations
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    flops, saved = count_flops_and_activations(lambda: model(x).sum().backward(), model)
    # the first Linear keeps its input, ReLU its output, which is also the second Linear's input (one storage);
    # the weights they keep are parameters
    assert saved == 4 * (8 * 16 + 8 * 32)
    # forward and weight-gradient matmuls of both layers, the input gradient of the second only (x needs none)
    assert flops == 2 * 8 * (2 * (16 * 32 + 32 * 4) + 32 * 4)


@pytest.mark.slow
def test_demo_timing_times_a_tiny_demo_from_outside_and_reads_its_timeline(tmp_path):
    out, timelines = tmp_path / "demo_timing.jsonl", tmp_path / "timelines"
    result = subprocess.run([sys.executable, str(ROOT / "bench/demo_timing.py"), "--repeats", "1",
                             "--run-dir", str(tmp_path / "run"), "--out", str(out), "--timelines", str(timelines),
                             "--", "--sweep-budget", "2", "--train-steps", "3", "--eval-samples", "16",
                             "--guided-samples", "10"], check=True, capture_output=True, text=True)
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["exit_status"] == 0
    # the outside clock holds the summary's, and the overhead is what is not a training step by that clock
    assert record["wall_s"] >= record["summary_wall_s"]
    assert record["overhead_s"] == pytest.approx(record["wall_s"] - record["training_steps_s"], abs=0.02)
    marks = record["stages_by_clock"]
    times = [marks[stage][edge] for stage in ("encode", "tune", "train", "evaluate") for edge in ("started", "done")]
    assert times == sorted(times) and times[-1] <= record["wall_s"]
    assert abs(len(record["idle_percent_by_second"]) - record["wall_s"]) <= 2
    assert record["fid_untrained_cfg1"] > 0 and record["guided_samples"] == 10
    assert record["machine"]["code_version"] == code_version() and record["machine"]["cpus"] >= 1
    assert re.search(r"^\| 1 \| \d+ min \d+ s \|", result.stdout, re.MULTILINE), result.stdout   # its table row
    assert "full_run: evaluate done" in (timelines / "run-1.txt").read_text()


def test_demo_timing_records_a_failed_run_and_goes_on(tmp_path):
    out = tmp_path / "demo_timing.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "bench/demo_timing.py"), "--repeats", "2",
                             "--run-dir", str(tmp_path / "run"), "--out", str(out), "--", "--preset", "no-such-preset"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "run(s) 1, 2 failed" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run"] for r in records] == [1, 2] and all(r["exit_status"] != 0 for r in records)
    assert "summary_wall_s" not in records[0]
    assert "| 1 |" in result.stdout and "failed (exit status" in result.stdout


def test_ray_memory_sorts_processes_into_roles_and_records_their_pss(tmp_path):
    import re

    from bench.ray_memory import main, role_of
    driver = re.compile(r"pipelines/study\.py")
    dashboard_helper = ("/venv/bin/python -B -c from multiprocessing.forkserver import main; main(25, 27, ['ray', "
                        "'ray.dashboard.subprocesses.module', '__main__'], pipelines/study.py")
    assert role_of("ray::TrainController.run", driver) == "ray::TrainController"
    assert role_of("/venv/lib/ray/core/src/ray/raylet/raylet --flag=/ray/dashboard/agent.py", driver) == "raylet"
    assert role_of(dashboard_helper, driver) == "dashboard"
    assert role_of(".venv/bin/python pipelines/study.py --study x", driver) == "driver"
    assert role_of("bash -c make test", driver) is None
    out = tmp_path / "memory.jsonl"
    record = main(["--label", "this test", "--driver-pattern", "pytest|test_bench", "--out", str(out)])
    assert record["roles"]["driver"]["processes"] >= 1 and record["roles"]["driver"]["pss_mib"] > 0
    assert json.loads(out.read_text()) == record


@pytest.mark.parametrize("module, flag, minimum", [
    ("pipelines.study", "--seeds", 1), ("pipelines.study", "--eval-samples", 2),
    ("pipelines.study", "--pretrain-images", 1), ("pipelines.repa_encoder", "--heads", 1),
    ("pipelines.demo_data", "--limit-per-class", 1), ("bench.demo_timing", "--repeats", 1),
    ("bench.cls_probe", "--probe-images", 4), ("bench.residual_probe", "--probe-images", 2),
    ("bench.residual_probe", "--every", 1), ("bench.demo_curve", "--steps", 1),
    ("bench.loader_scale", "--batch-size", 1), ("bench.step_time", "--steps", 1),
    ("bench.path_512", "--steps", 1), ("bench.train_overhead", "--repeats", 1),
    ("bench.encode_throughput", "--batch-size", 1), ("bench.gpu", "--steps", 1),
])
def test_a_command_refuses_a_count_below_its_minimum_before_any_work(module, flag, minimum, monkeypatch, capsys):
    """The commands that parse with argparse alone (no typed options) refuse through the same at_least type: usage,
    the flag named, exit status 2, before they read data or start Ray."""
    import importlib
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, flag, str(minimum - 1)])     # mains without argv read sys.argv
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and f"argument {flag}: must be >= {minimum}, got {minimum - 1}" in capsys.readouterr().err


def test_at_least_accepts_its_minimum_and_names_the_type_of_a_non_number(capsys):
    import argparse
    from pipelines.common import at_least
    assert at_least(2)("2") == 2 and at_least(0)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 2, got 1"):
        at_least(2)("1")
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=at_least(1))
    assert parser.parse_args(["--steps", "5"]).steps == 5 and parser.parse_args([]).steps is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "five"])
    assert "argument --steps: invalid integer >= 1 value: 'five'" in capsys.readouterr().err


def test_the_checkpoint_probe_measures_what_it_says_on_an_untrained_denoiser():
    """An untrained backbone outputs 0 (adaLN-Zero's final layer), so D(x) = c_skip x: the error and the spread the
    probe reports must be the ones computed by hand from the EDM coefficients."""
    from bench.checkpoint_probe import probe_run
    from sddit.diffusion import edm_coefficients, edm_loss_weight
    from sddit.training import build_training
    from tests.conftest import tiny_config
    config = tiny_config("DiT-S/2", in_channels=3, num_classes=3)
    torch.manual_seed(0)
    _, _, ema, _ = build_training(config)
    x0 = torch.randn(12, 3, 8, 8) * 0.5
    y, noise = torch.arange(12) % 3, torch.randn(12, 3, 8, 8)
    point = probe_run(ema, config, x0, y, noise, [0.05, 20.0], token_sigma=0.5)
    for sigma in (0.05, 20.0):
        c_skip = edm_coefficients(torch.tensor(sigma), config.model.sigma_data)[0]
        denoised = c_skip * (x0 + sigma * noise)
        expected = float((edm_loss_weight(torch.tensor(sigma), config.model.sigma_data) * (denoised - x0) ** 2).mean())
        spread = torch.stack([denoised[y == c].std(dim=0).mean() for c in range(3)]).mean() / \
            torch.stack([x0[y == c].std(dim=0).mean() for c in range(3)]).mean()
        assert point[f"denoise_error_sigma{sigma:g}"] == pytest.approx(expected, rel=1e-4)
        assert point[f"output_spread_sigma{sigma:g}"] == pytest.approx(float(spread), rel=1e-4)
    # at sigma 0.05 D keeps the image's spread; at 20 c_skip shrinks everything towards 0
    assert point["output_spread_sigma0.05"] > 0.95 and point["output_spread_sigma20"] < 0.1
    assert 0 <= point["token_class_accuracy"] <= 1


def test_the_checkpoint_probe_finds_a_studys_runs_by_arm_and_writes_a_line_per_run(
        ray_session, image_tree, tmp_path, capsys):
    from bench.checkpoint_probe import main
    from sddit.checkpoint import rng_state, save_checkpoint
    from sddit.data import Manifest
    from sddit.training import build_training, dataset_info
    from tests.conftest import tiny_config
    from tests.fixtures import encode_pixels
    data = encode_pixels(image_tree[0], tmp_path / "pixels8", 8)
    config = tiny_config("SD-DiT-S/2", in_channels=3, num_classes=3)
    model, optimizer, ema, _ = build_training(config)
    storage = tmp_path / "ray"
    for folder in ("study-t-DiT-seed0-0123abcd", "study-t-SD-DiT-no-disc-seed1-89abcdef",   # the two runs of t
                   "study-t-256-DiT-seed0-0123abcd",             # a study named t-256: not an arm '256-DiT' of t
                   "study-t-MyArm-seed0-0123abcd"):              # not a built-in arm
        save_checkpoint(storage / folder / "checkpoint_2026" / "checkpoint.pt", config=config, model=model,
                        generation_ema=ema, optimizer=optimizer, step=7, images_seen=0, data_position={},
                        rng=rng_state(), dataset=dataset_info(Manifest.read(data), data))
    (storage / "study-t-SD-DiT-seed0-0123abcd").mkdir()       # no checkpoint yet: skipped
    out = tmp_path / "probe.jsonl"
    records = main(["--study", "t", "--storage", str(storage), "--data", str(data), "--images", "8",
                    "--sigmas", "0.5,2", "--out", str(out)])
    assert [(r["arm"], r["seed"], r["step"]) for r in records] == [("DiT", 0, 7), ("SD-DiT-no-disc", 1, 7)]
    assert [json.loads(line)["arm"] for line in out.read_text().splitlines()] == ["DiT", "SD-DiT-no-disc"]
    capsys.readouterr()
    main(["--table", str(out)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| study | arm | seeds | token class accuracy | sigma 0.5: error / spread")
    assert table[2].startswith("| t | DiT | 1 | ") and table[3].startswith("| t | SD-DiT-no-disc | 1 | ")
    save_checkpoint(storage / "study-u-DiT-seed0-0123abcd" / "checkpoint_2026" / "checkpoint.pt", config=config,
                    model=model, generation_ema=ema, optimizer=optimizer, step=7, images_seen=0, data_position={},
                    rng=rng_state(), dataset={**dataset_info(Manifest.read(data), data), "latent_shape": [3, 16, 16]})
    with pytest.raises(SystemExit, match="was trained on \\[3, 16, 16\\] latents"):
        main(["--study", "u", "--storage", str(storage), "--data", str(data), "--images", "8"])
