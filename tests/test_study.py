"""pipelines/study.py: arms that differ only where the paper varies them, and a tiny study end to end."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures import TINY, encode_pixels

FAILING_ARM = {"Diverges": {"family": "DiT", "set": ["diffusion.p_mean=1000", "train.max_bad_steps=1"]}}


# --- arms and plans, without Ray ------------------------------------------------------------------------------

def flat_config(arm, base):
    from pipelines.study_plan import arm_overrides
    from sddit.config import apply_overrides
    return apply_overrides(base, arm_overrides(arm, base.model.name)).flat()


@pytest.mark.parametrize("study", ["paper-fig3", "paper-tab3", "paper-fig5", "paper-fig6", "temperatures",
                                   "disc-terms", "mask-blocks", "maskdm", "cls-signal"])
def test_every_builtin_arm_builds_and_shares_the_backbone_batch_and_lr(study):
    from pipelines.study_plan import STUDIES
    from sddit.config import load_preset
    base = load_preset("fashion-mnist")
    configs = {arm: flat_config(arm, base) for arm in STUDIES[study]}
    shared = ("model.hidden_size", "model.depth", "model.num_heads", "model.patch_size", "optim.batch_size",
              "optim.lr", "train.steps", "model.decoder_hidden_size", "model.head_out_size")
    for key in shared:
        assert len({c[key] for c in configs.values()}) == 1, key


def test_ablation_arms_differ_only_in_the_fields_the_paper_varies():
    from sddit.config import load_preset
    base = load_preset("fashion-mnist")
    sd = flat_config("SD-DiT", base)

    def differs(arm):
        return {k for k, v in flat_config(arm, base).items() if v != sd[k]}

    assert differs("SD-DiT-no-mask") == {"model.mask_ratio"}
    assert differs("SD-DiT-no-disc") == {"model.disc_weight", "model.cls_token"}
    assert differs("SD-DiT-tsigma-student") == {"diffusion.teacher_sigma_dist"}
    # both temperature arms set theirs explicitly: one of them is the preset's
    assert differs("SD-DiT-dino-temps") | differs("SD-DiT-paper-temps") == {"disc.teacher_temp_start",
                                                                             "disc.teacher_temp_end"}
    assert differs("SD-DiT-mask0.5") == {"model.mask_ratio"}
    assert differs("SD-DiT-no-cls") == {"disc.cls_weight"}
    assert differs("SD-DiT-no-patch") == {"disc.patch_weight"}
    assert differs("SD-DiT-block2") == {"model.mask_block_size"}
    assert differs("SD-DiT-zero-cls") == {"model.cls_gate"}                  # the preset's CLS is open
    assert differs("SD-DiT-teacher-label") | differs("SD-DiT-teacher-null-label") == {"disc.teacher_label"}
    maskdit_block = flat_config("MaskDiT-block4", base)
    assert {k for k, v in maskdit_block.items() if v != flat_config("MaskDiT", base)[k]} == {"model.mask_block_size"}
    maskdm = flat_config("MaskDM", base)
    assert {k for k, v in maskdm.items() if v != flat_config("MaskDiT", base)[k]} == {
        "model.mae_weight", "train.unmasked_fraction"}                   # masked score matching, then no masks
    assert {k for k, v in flat_config("MaskDM-crop", base).items() if v != maskdm[k]} == {"model.mask_crop"}
    dit = flat_config("DiT", base)
    assert dit["model.name"] == "DiT-S/2" and dit["model.decoder_depth"] == 0 and dit["model.disc_weight"] == 0
    assert differs("SD-DiT-no-disc-no-mask") == {"model.disc_weight", "model.cls_token", "model.mask_ratio"}
    # and from DiT only by the decoder: what separates the decoder's share from masking's
    assert {k for k, v in flat_config("SD-DiT-no-disc-no-mask", base).items() if v != dit[k]} == {
        "model.name", "model.decoder_depth"}
    maskdit = flat_config("MaskDiT", base)
    assert maskdit["model.mask_token"] and maskdit["model.mask_ratio"] == 0.5 and maskdit["model.mae_weight"] == 0.1
    assert maskdit["model.decoder_depth"] == sd["model.decoder_depth"]


def test_spread_rule():
    from pipelines.study_report import exceeds_spread
    assert exceeds_spread((10.0, 1.0, 3), (20.0, 1.0, 3))
    assert not exceeds_spread((10.0, 5.0, 3), (13.0, 5.0, 3))
    assert not exceeds_spread((10.0, 0.0, 1), (20.0, 0.0, 1))      # one seed has no spread to compare with


def test_arms_whose_cls_targets_stayed_uniform_are_flagged():
    import math

    from pipelines.study_report import arms_without_cls_signal
    ln_k = math.log(64)
    rows = [{"arm": "flat", "target_entropy_cls": ln_k - 0.004}, {"arm": "flat", "target_entropy_cls": ln_k},
            {"arm": "live", "target_entropy_cls": ln_k - 0.004}, {"arm": "live", "target_entropy_cls": ln_k - 0.3},
            {"arm": "DiT", "target_entropy_cls": ""}]
    assert arms_without_cls_signal(rows, ["flat", "live", "DiT"], 64) == ["flat"]


@pytest.fixture(scope="module")
def tiny_data(ray_session, image_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    data = encode_pixels(image_tree[0], root / "pixel8", 8)
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    arms = root / "arms.yaml"
    arms.write_text(yaml.safe_dump(FAILING_ARM))
    return root, data, preset, arms


def study_args(root, data, preset, arms, *extra):
    return ["--arms", "DiT,SD-DiT,Diverges", "--arms-file", str(arms), "--name", "tiny", "--data", str(data),
            "--preset", str(preset), "--seeds", "2", "--images-per-arm", "32", "--eval-points", "2",
            "--eval-samples", "8", "--eval-heun-steps", "2", "--out", str(root / "out"),
            "--run-dir", str(root / "runs"), *extra]


def test_bad_study_inputs_fail_before_ray_naming_the_field(tiny_data, tmp_path):
    from pipelines.study import main
    from sddit.data import DataError
    from sddit.errors import ConfigError
    root, data, preset, arms = tiny_data
    with pytest.raises(ConfigError, match="unknown arm 'DiTT'"):
        main(["--arms", "DiTT", "--data", str(data), "--preset", str(preset), "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="listed twice"):
        main(["--arms", "DiT,DiT", "--data", str(data), "--preset", str(preset), "--out", str(tmp_path)])
    with pytest.raises(DataError, match="manifest.json"):
        main(["--arms", "DiT", "--data", str(data), "--preset", str(preset), "--out", str(tmp_path),
              "--reference", str(tmp_path / "missing")])


def test_a_run_killed_after_its_last_evaluation_but_before_its_last_checkpoint_is_not_complete(tmp_path):
    """The last step logs its evaluation first, then writes its checkpoint: a kill between the two left a run that
    looked finished without its final model (seen once in runs/ray). A rerun must train it again from the older
    checkpoint; a run whose checkpoints were all deleted still counts by its evaluations."""
    from pipelines.study import outcomes_of
    from sddit.checkpoint import rng_state, save_checkpoint
    from sddit.training import build_training
    from tests.conftest import tiny_config
    config = tiny_config("DiT-S/2")
    model, optimizer, ema, _ = build_training(config)

    def checkpoint(name, step, stamp):
        save_checkpoint(tmp_path / name / f"checkpoint_2026-12-06_22-{stamp}" / "checkpoint.pt", config=config,
                        model=model, generation_ema=ema, optimizer=optimizer, step=step, images_seen=0,
                        data_position={}, rng=rng_state(), dataset={})
    checkpoint("run-a", 750, "10"), checkpoint("run-a", 1000, "16")     # finished
    checkpoint("run-b", 750, "16")                                       # killed between the two
    checkpoint("run-d", 500, "10")                                       # stopped part-way
    plan = {"steps": 1000, "runs": {label: {"name": f"run-{label}"} for label in "abcd"}}
    done = {"a": (None, [250, 500, 750, 1000]), "b": (None, [250, 500, 750, 1000]),
            "c": (None, [250, 500, 750, 1000]), "d": (None, [250, 500])}    # c: its checkpoints deleted
    outcomes = outcomes_of(done, plan, {}, tmp_path)
    assert {label: o["status"] for label, o in outcomes.items()} == {
        "a": "completed", "b": "incomplete", "c": "completed", "d": "incomplete"}
    assert outcomes["b"] == {"status": "incomplete", "last_step": 750,
                             "note": "evaluated at step 1000, but its last checkpoint is step 750"}


def test_a_continued_study_refuses_a_judge_other_than_the_one_that_scored_it():
    from pipelines.study import check_same_judge
    from sddit.errors import ConfigError
    plan = {"name": "fmnist", "judge": {"extractor": "domain", "weights_sha256": "b" * 64}}
    check_same_judge(plan, {"judge.weights_sha256": "b" * 64})
    check_same_judge(plan, {})                           # a study started before judges were recorded
    with pytest.raises(ConfigError, match="judge with weights sha256 aaaaaaaaaaaa.*now bbbbbbbbbbbb.*another --name"):
        check_same_judge(plan, {"judge.weights_sha256": "a" * 64})


@pytest.fixture(scope="module")
def tiny_study(tiny_data):
    from pipelines.study import main
    root, data, preset, arms = tiny_data
    return root, main(study_args(root, data, preset, arms))


def test_tiny_study_writes_csv_summary_and_plots(tiny_study):
    root, summary = tiny_study
    out = root / "out"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 arms x 2 seeds x 2 evaluation points (4 steps of batch 8 = 32 images, evaluated at 16 and 32)
    assert sorted((r["arm"], r["seed"], r["images_seen"]) for r in rows) == sorted(
        (arm, str(seed), str(images)) for arm in ("DiT", "SD-DiT") for seed in (0, 1) for images in (16, 32))
    assert all(float(r["fid"]) > 0 and r["sfid"] and 0 <= float(r["class_agreement"]) <= 1 for r in rows)
    assert all(r["loss_cls"] and float(r["teacher_cls_token_std"]) > 0 for r in rows if r["arm"] == "SD-DiT")
    assert all(float(r["train_seconds"]) > 0 for r in rows)
    text = (out / "summary.md").read_text()
    assert "| 32 |" in text and "DiT vs SD-DiT: FID" in text
    assert "Judge: the domain classifier with weights sha256 `" in text
    assert "## Runs that did not finish" in text and "Diverges@seed0" in text and "non-finite" in text
    for name in ("fid_vs_images.png", "fid_vs_wallclock.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    outcomes = json.loads((out / "outcomes.json").read_text())
    assert {label: o["status"] for label, o in outcomes.items()} == {
        "DiT@seed0": "completed", "DiT@seed1": "completed", "SD-DiT@seed0": "completed",
        "SD-DiT@seed1": "completed", "Diverges@seed0": "error", "Diverges@seed1": "error"}


def test_tiny_study_mlflow_has_a_parent_with_a_child_per_run(tiny_study):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    root, _ = tiny_study
    client = MlflowClient(tracking_uri(root / "runs"))
    experiment = client.get_experiment_by_name("sddit")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`sddit.study_name` = 'tiny'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((c.data.params["study.arm"], c.data.params["study.seed"]) for c in children) == sorted(
        (arm, str(seed)) for arm in ("DiT", "SD-DiT", "Diverges") for seed in (0, 1))
    assert len(parent.data.params["judge.weights_sha256"]) == 64 and parent.data.params["judge.extractor"] == "domain"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "summary.md", "outcomes.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} >= {
        "plots/fid_vs_images.png", "plots/fid_vs_wallclock.png"}
    assert parent.data.metrics["runs_failed"] == 2 or client.get_run(parent.info.run_id).data.metrics["runs_failed"] == 2


def test_report_only_writes_the_report_of_what_finished_without_training(tiny_study, capsys):
    from pipelines.study import main
    root, _ = tiny_study
    args = study_args(root, root / "pixel8", root / "tiny.yaml", root / "arms.yaml")
    args[args.index("--out") + 1] = str(root / "report-only")
    capsys.readouterr()
    main([*args, "--report-only"])
    printed = capsys.readouterr().out
    assert "--report-only: 2 unfinished runs left as they are" in printed and " runs of " not in printed
    assert (root / "report-only" / "results.csv").read_text() == (root / "out" / "results.csv").read_text()


def test_rerun_repeats_only_the_runs_that_did_not_finish(tiny_study, capsys):
    from pipelines.study import main
    root, _ = tiny_study
    before = (root / "out" / "results.csv").read_text()
    capsys.readouterr()
    main(study_args(root, root / "pixel8", root / "tiny.yaml", root / "arms.yaml"))
    printed = capsys.readouterr().out
    assert "study tiny: 2 runs of 4 steps" in printed          # only the failed arm's two seeds again
    assert (root / "out" / "results.csv").read_text() == before


@pytest.mark.parametrize("study", ["paper-fig3", "paper-tab3", "paper-fig5", "paper-fig6", "temperatures",
                                   "disc-terms"])
def test_every_builtin_study_plans_on_a_dataset(tiny_data, tmp_path, study):
    """The whole plan (configs fitted to the data, equal images, one run per arm x seed) before any Ray work."""
    from pipelines.study import parse_args
    from pipelines.study_plan import STUDIES, plan_study
    root, data, preset, _ = tiny_data
    plan = plan_study(parse_args(["--study", study, "--data", str(data), "--preset", str(preset), "--seeds", "2",
                                  "--images-per-arm", "100", "--eval-points", "3", "--out", str(tmp_path)]))
    assert plan["arms"] == STUDIES[study] and len(plan["runs"]) == 2 * len(STUDIES[study])
    assert plan["steps"] % 3 == 0 and plan["images"] >= 100 and plan["every"] * 3 == plan["steps"]
    assert len({run["name"] for run in plan["runs"].values()}) == len(plan["runs"])   # stable, distinct names


def test_a_changed_setting_gives_new_run_names_so_reruns_never_mix_configs(tiny_data, tmp_path):
    from pipelines.study import parse_args
    from pipelines.study_plan import plan_study
    _, data, preset, _ = tiny_data
    common = ["--arms", "DiT,SD-DiT", "--data", str(data), "--preset", str(preset), "--out", str(tmp_path)]
    first = plan_study(parse_args(common))["runs"]
    again = plan_study(parse_args(common))["runs"]
    longer = plan_study(parse_args(common + ["--images-per-arm", "64000"]))["runs"]
    other_lr = plan_study(parse_args(common + ["--set", "optim.lr=0.01"]))["runs"]
    assert {k: r["name"] for k, r in first.items()} == {k: r["name"] for k, r in again.items()}
    for changed in (longer, other_lr):
        assert all(first[k]["name"] != changed[k]["name"] for k in first)


# --- resolution transfer arms: a pre-training grid first, then the study's runs from its checkpoints ---------

@pytest.fixture(scope="module")
def data16(tiny_data, image_tree):
    return encode_pixels(image_tree[0], tiny_data[0] / "pixel16", 16)


def transfer_args(root, data16, *extra):
    # pre-trained at 16 px, transferred to 8 px: the mechanism is the same either way, and FID on the tiny
    # image tree is only well defined at 8 px (at 16 px the judge's feature covariances are singular)
    return ["--arms", "DiT,DiT-transfer", "--name", "tiny-transfer", "--data", str(root / "pixel8"),
            "--pretrain-data", str(data16), "--pretrain-images", "24", "--preset", str(root / "tiny.yaml"),
            "--seeds", "1", "--images-per-arm", "16", "--eval-points", "2", "--eval-samples", "8", "--eval-heun-steps", "2",
            "--out", str(root / "out-transfer"), "--run-dir", str(root / "runs"), *extra]


def test_transfer_arms_need_a_dataset_at_another_resolution(tiny_data, data16, tmp_path):
    from pipelines.study import parse_args
    from pipelines.study_plan import plan_study
    from sddit.data import DataError
    from sddit.errors import ConfigError
    root = tiny_data[0]
    args = transfer_args(root, data16)
    with pytest.raises(ConfigError, match="pretrain_data"):
        plan_study(parse_args([a for a in args if a not in ("--pretrain-data", str(data16))]))
    with pytest.raises(DataError, match="the same resolution"):
        plan_study(parse_args(args[:args.index("--pretrain-data") + 1] + [str(root / "pixel8")]
                              + args[args.index("--pretrain-data") + 2:]))


@pytest.mark.slow                   # a study of its own (pre-training grid, then the transfer grid): ~40 s
def test_a_transfer_study_pretrains_then_starts_the_arm_from_that_checkpoint(tiny_data, data16, capsys):
    from pipelines.study import final_checkpoint, main, parse_args, storage_of
    from pipelines.study_plan import plan_study
    from sddit.checkpoint import load_checkpoint
    root = tiny_data[0]
    summary = main(transfer_args(root, data16))
    assert {label: o["status"] for label, o in summary["outcomes"].items()} == {
        "DiT@seed0": "completed", "DiT-transfer@seed0": "completed"}
    args = parse_args(transfer_args(root, data16))
    plan = plan_study(args)
    pretrained = final_checkpoint(storage_of(args), plan["pretrain_runs"]["DiT-transfer@seed0"])
    source = load_checkpoint(pretrained)
    assert source["step"] == 3 and source["config"].model.input_size == 16          # 24 images at batch 8
    transferred = plan["runs"]["DiT-transfer@seed0"]
    [end] = sorted((storage_of(args) / transferred["name"]).glob("checkpoint_*/checkpoint.pt"))[-1:]
    final = load_checkpoint(end.parent)
    assert final["config"].model.input_size == 8 and final["config"].model.pos_embed_grid == 8
    assert "The -transfer arms start from a run of their family at 16 px" in (
        root / "out-transfer" / "summary.md").read_text()
    capsys.readouterr()
    main(transfer_args(root, data16))                                   # all finished: nothing runs again
    assert "already finished" in capsys.readouterr().out


def test_a_switch_added_later_leaves_the_names_of_recorded_runs_alone():
    """A run's name carries its config's digest; fields the library gained after a study was recorded, at the
    value that leaves the run unchanged, must not rename it (a rerun would restart it instead of continuing)."""
    from pipelines.study_plan import ADDED_LATER, run_digest
    from sddit.config import load_preset
    flat = load_preset("fashion-mnist").flat()
    assert set(ADDED_LATER) <= set(flat) and all(flat[key] == value for key, value in ADDED_LATER.items())
    before = {key: value for key, value in flat.items() if key not in ADDED_LATER}    # the config as it was recorded
    assert run_digest(flat, {}) == run_digest(before, {})
    assert run_digest({**flat, "model.sra_weight": 0.2}, {}) != run_digest(flat, {})   # switched on: a new run
    assert run_digest(flat, {"pretrain": "x"}) != run_digest(flat, {})


def test_every_config_field_was_recorded_or_is_listed_as_added_later():
    """The fields a recorded study's digests were computed over (tests/recorded_config_fields.json, as of the
    cls-signal grid): a new field must go into ADDED_LATER with its neutral value, or recorded runs restart."""
    from pipelines.study_plan import ADDED_LATER
    from sddit.config import load_preset
    recorded = set(json.loads((Path(__file__).parent / "recorded_config_fields.json").read_text()))
    assert set(load_preset("fashion-mnist").flat()) - recorded - set(ADDED_LATER) == set()
