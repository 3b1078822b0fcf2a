"""A tiny sweep on CPU: ASHA stops weak trials, a failing trial is recorded, the best config trains."""
import json
import threading

import pytest
import yaml

from tests.fixtures import TINY, encode_pixels


@pytest.fixture(scope="module")
def sweep(ray_session, image_tree, tmp_path_factory):
    import tuning.sweep
    from tuning.sweep import main as sweep_main
    judge_threads = []

    def recorded_prepare_judge(*args):
        judge_threads.append(threading.current_thread())
        return prepare_judge(*args)

    prepare_judge = tuning.sweep.prepare_judge
    root = tmp_path_factory.mktemp("tune")
    data = encode_pixels(image_tree[0], root / "pixel8", 8)
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    space = root / "space.yaml"
    # a grid, so the 4 trials are known: lr 1e-5 learns nothing (ASHA should stop it), -1 is invalid (fails)
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "grid", "values": [3e-3, 1e-5, 1e-3, -1.0]},
                                     "diffusion.teacher_sigma": {"type": "choice", "values": [0.002]}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuning.sweep, "prepare_judge", recorded_prepare_judge)
        summary = sweep_main(["--data", str(data), "--preset", str(preset), "--space", str(space), "--search", "grid",
                              "--num-samples", "1", "--budget-steps", "12", "--grace-steps", "4",
                              "--proxy-samples", "24", "--max-concurrent", "1", "--name", "tiny",
                              "--run-dir", str(root / "runs")])
    summary["judge_threads"] = judge_threads
    return root, data, summary


def test_the_judge_trains_once_beside_the_trials_not_before_them(sweep):
    _, data, summary = sweep
    assert len(summary["judge_threads"]) == 1
    assert summary["judge_threads"][0] is not threading.main_thread()
    assert (data / "domain_classifier.pt").is_file()


def test_sweep_stops_weak_trials_and_records_the_failed_one(sweep):
    root, _, summary = sweep
    trials = summary["trials"]
    assert len(trials) == 4
    statuses = {t["params"]["optim.lr"]: t["status"] for t in trials}
    assert statuses[-1.0] == "error"
    failed = next(t for t in trials if t["status"] == "error")
    assert "optim.lr" in failed["error"]
    assert "stopped early" in statuses.values()             # ASHA cut at least one trial before the budget
    assert sum(s == "completed" for s in statuses.values()) >= 1
    assert summary["metric"] == "proxy_fid_domain"
    assert summary["best"]["params"]["optim.lr"] in (3e-3, 1e-3)
    saved = json.loads((root / "runs" / "sweeps" / "tiny" / "trials.json").read_text())
    assert saved["best"] == summary["best"]


def test_best_config_is_a_preset_the_train_stage_loads(sweep):
    from pipelines.train import parse_args, resolve_config
    root, data, summary = sweep
    args = parse_args(["--data", str(data), "--preset", summary["best_config"], "--num-workers", "1"])
    config = resolve_config(args)
    assert config.optim.lr == summary["best"]["params"]["optim.lr"]
    assert config.model.hidden_size == TINY["model"]["hidden_size"]
    # the preset's own schedule, not the trials' 12-step budget and 4-step checkpoint cadence
    assert (config.train.steps, config.train.checkpoint_every, config.train.log_every) == (
        TINY["train"]["steps"], TINY["train"]["checkpoint_every"], TINY["train"]["log_every"])
    assert summary["best_checkpoint"], "the best trial's checkpoint is handed on"


def test_mlflow_has_the_sweep_run_with_trial_children_and_the_plot(sweep):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    root, _, summary = sweep
    client = MlflowClient(tracking_uri(root / "runs"))
    experiment = client.get_experiment_by_name("sddit")
    [sweep_run] = client.search_runs([experiment.experiment_id], "tags.`sddit.sweep_name` = 'tiny'")
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    assert len(children) == 3                                 # the invalid trial never started training
    for child in children:
        assert "searched.optim.lr" in child.data.params
        assert child.info.status == "FINISHED"                # completed or stopped by ASHA: ended by the driver
        assert client.get_metric_history(child.info.run_id, "proxy_fid_domain")
    artifacts = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    assert {"best.yaml", "trials.json", "proxy_vs_params.png"} <= artifacts
    assert sweep_run.data.metrics["trials_errored"] == 1


def test_the_driver_ends_a_trial_run_by_how_the_trial_ended(tmp_path):
    """Trial runs are created by the trial's rank 0 and ended by the driver's callback: an errored trial's run is
    FAILED, a finished one's FINISHED, another trial's run untouched; a trial with no run yet is no error."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri, use_store
    from pipelines.train import find_or_create_run
    from pipelines.trials import TrialContext, trial_runs_callback
    from sddit.config import Config
    uri = tracking_uri(tmp_path)
    experiment_id = use_store(uri).experiment_id
    client = MlflowClient(uri)
    context = TrialContext(base_config=Config(), data="unused", mlflow_uri=uri, experiment_id=experiment_id,
                           parent_run_id=None, storage="unused", cpus_per_worker=1, sweep_name="probe")
    run_ids = {trial_id: find_or_create_run(client, experiment_id, f"probe-{trial_id}", {"optim.lr": 1e-3})
               for trial_id in ("a_00000", "a_00001", "a_00002")}
    callback = trial_runs_callback(context)
    callback.on_trial_error(0, [], SimpleNamespace(trial_id="a_00000", config={}))
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="a_00001", config={}))
    callback.on_trial_error(0, [], SimpleNamespace(trial_id="never_started", config={}))
    assert [client.get_run(run_ids[t]).info.status for t in sorted(run_ids)] == ["FAILED", "FINISHED", "RUNNING"]


@pytest.mark.parametrize("flag", ["--budget-steps", "--proxy-samples", "--proxy-heun-steps", "--num-samples"])
def test_non_positive_sizes_are_refused_before_ray_starts(flag, capsys):
    from tuning.sweep import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--data", "unused", flag, "0"])
    assert f"{flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_random_search_samples_the_same_trials_for_the_same_seed(ray_session, tmp_path):
    from ray import tune

    from tuning.sweep import make_searcher, tune_domain
    space = tune_domain({"model.mask_ratio": {"type": "uniform", "low": 0.0, "high": 0.5},
                         "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}})

    def sampled(seed: int, name: str) -> list:
        tuner = tune.Tuner(lambda config: tune.report({"score": 0.0}), param_space=space,
                           tune_config=tune.TuneConfig(num_samples=3, search_alg=make_searcher("random", "score", seed)),
                           run_config=tune.RunConfig(name=name, storage_path=str(tmp_path)))
        return sorted(tuple(sorted(result.config.items())) for result in tuner.fit())

    first = sampled(0, "first")
    assert sampled(0, "again") == first
    assert sampled(1, "other-seed") != first


def test_best_checkpoint_is_from_the_step_its_metric_was_measured_at(sweep):
    # a trial's last step used to be reported twice (metrics, then metrics + checkpoint); Tune stopped the
    # trial at max_t on the first report, so the best trial handed on an older checkpoint than its metric
    from sddit.checkpoint import load_checkpoint
    _, _, summary = sweep
    best = summary["best"]
    assert load_checkpoint(best["checkpoint"])["step"] == best["last_step"]


def test_a_trial_rerun_after_its_training_finished_still_reports_its_metric(sweep, tmp_path):
    """A sweep killed between a trial's final checkpoint and Tune's record of it reruns that trial on --resume:
    its Ray Train run restores the final checkpoint and trains no step, and must still report the metric Tune
    ranks by (Tune fails a sweep whose trial ends without it). A study's trial names its run, so a second
    Tuner reruns the same finished training deterministically."""
    from ray import tune

    from pipelines.tracking import tracking_uri, use_store
    from sddit.config import load_preset
    from pipelines.trials import TrialContext, trial_trainable
    root, data, _ = sweep
    uri = tracking_uri(tmp_path / "runs")
    context = TrialContext(base_config=load_preset(root / "tiny.yaml"), data=str(data),
                           runs={"only": {"overrides": [], "params": {}, "name": "finished"}},
                           mlflow_uri=uri, experiment_id=use_store(uri).experiment_id, parent_run_id=None,
                           storage=str(tmp_path / "ray"), cpus_per_worker=1)

    def trial_result(experiment: str):
        tuner = tune.Tuner(trial_trainable(context), param_space={"run": "only"},
                           tune_config=tune.TuneConfig(metric="loss", mode="min"),
                           run_config=tune.RunConfig(name=experiment, storage_path=str(tmp_path / "tune")))
        [result] = tuner.fit()
        return result

    first, again = trial_result("first"), trial_result("again")
    assert first.error is None and again.error is None
    assert again.metrics["step"] == first.metrics["step"] == TINY["train"]["steps"]
    assert again.metrics["loss"] == first.metrics["loss"]


@pytest.mark.slow
def test_a_killed_sweep_continues_its_trials_with_resume(sweep, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    from tuning.sweep import main as sweep_main
    root, data, _ = sweep
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "grid", "values": [3e-3, 2e-3, 1e-3]}}))
    runs = tmp_path / "runs"
    args = ["--data", str(data), "--preset", str(root / "tiny.yaml"), "--space", str(space), "--search", "grid",
            "--scheduler", "none", "--num-samples", "1", "--budget-steps", "12", "--proxy-samples", "16",
            "--max-concurrent", "1", "--name", "resumable", "--run-dir", str(runs)]
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, str(repo / "tuning/sweep.py"), *args], cwd=repo, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:                                                    # kill -9 once the first trial has finished its budget
        deadline = time.time() + 300
        while not list((runs / "ray").glob("resumable-*/checkpoint_*/checkpoint.pt")) or len(
                list((runs / "ray").glob("resumable-*"))) < 2:
            assert time.time() < deadline and process.poll() is None, "the sweep never got past its first trial"
            time.sleep(1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    started = {p.name for p in (runs / "ray").glob("resumable-*")}
    summary = sweep_main(args + ["--resume"])
    assert [t["status"] for t in summary["trials"]] == ["completed"] * 3
    assert sorted(t["params"]["optim.lr"] for t in summary["trials"]) == [1e-3, 2e-3, 3e-3]
    # the same trials continued (their run directories reused), not a new sweep beside the old one
    assert started <= {p.name for p in (runs / "ray").glob("resumable-*")}
    assert len({p.name for p in (runs / "ray").glob("resumable-*")}) == 3
    client = MlflowClient(tracking_uri(runs))
    experiment = client.get_experiment_by_name("sddit")
    parents = client.search_runs([experiment.experiment_id], "tags.`sddit.sweep_name` = 'resumable'")
    assert len(parents) == 1
