"""full_run end to end on the embedded demo (tiny budgets), and its MLflow store in a real browser."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

SMOKE = ["--sweep-samples", "2", "--sweep-budget", "8", "--train-steps", "8", "--eval-samples", "30",
         "--guided-samples", "20", "--eval-steps", "4"]


@pytest.fixture(scope="module")
def smoke(ray_session, tmp_path_factory):
    from pipelines.full_run import main
    run_dir = tmp_path_factory.mktemp("full_run") / "runs"
    summary = main(["--run-dir", str(run_dir)] + SMOKE)
    return run_dir, summary


def test_demo_pipeline_runs_every_stage_and_summarises(smoke):
    run_dir, summary = smoke
    assert set(summary["stages"]) == {"encode", "tune", "train", "evaluate"}
    for key in ("metrics_cfg1", "metrics_cfg", "metrics_untrained_cfg1"):
        assert {"fid_domain", "is_domain", "class_agreement_domain"} <= set(summary[key])
    assert Path(summary["samples"]).is_file() and Path(summary["checkpoint"]).is_dir()
    guided = np.load(Path(summary["checkpoint"]) / "eval-4steps-cfg5" / "samples.npz")
    cfg1 = np.load(Path(summary["checkpoint"]) / "eval-4steps-cfg1" / "samples.npz")
    assert len(guided["arr_0"]) == summary["guided_samples"] == 20 and len(cfg1["arr_0"]) == 30
    saved = json.loads((run_dir / "demo_summary.json").read_text())
    assert saved["checkpoint"] == summary["checkpoint"]
    digits = run_dir / "demo" / "digits"
    assert sorted(p.name for p in digits.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in digits.rglob("*.png")) == 1797


@pytest.mark.parametrize("argv, eval_samples, guided_samples", [
    ([], 500, 200),                                     # the demo: the guided pass only checks recognisability
    (["--eval-samples", "100"], 100, 100),
    (["--guided-samples", "300"], 500, 300),
    (["--preset", "imagenet256-XL2", "--cluster", "--data", "/shared/imagenet"], 50_000, 50_000),
])
def test_the_guided_evaluation_is_smaller_only_for_the_demo(argv, eval_samples, guided_samples):
    from pipelines.full_run import Plan, parse_args
    plan = Plan(parse_args(argv))
    assert (plan.eval_samples, plan.guided_samples) == (eval_samples, guided_samples)


def test_mlflow_has_one_parent_run_with_a_child_per_stage(smoke):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    run_dir, _ = smoke
    client = MlflowClient(tracking_uri(run_dir))
    experiment = client.get_experiment_by_name("sddit")
    parent = client.search_runs([experiment.experiment_id], "tags.`sddit.stage` = 'pipeline'",
                                order_by=["attributes.start_time ASC"])[0]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages = sorted(child.data.tags["sddit.stage"] for child in children)
    assert stages == ["encode", "evaluate", "evaluate", "evaluate", "train", "tune"]
    assert "metrics_cfg1.fid_domain" in parent.data.metrics


def test_rerunning_continues_instead_of_repeating(smoke):
    """Same command again: shards, sweep, training and samples are all found done."""
    from pipelines.full_run import main
    run_dir, first = smoke
    again = main(["--run-dir", str(run_dir)] + SMOKE)
    assert again["checkpoint"] == first["checkpoint"]
    assert again["metrics_cfg1"] == first["metrics_cfg1"]


@pytest.fixture
def mlflow_server(smoke):
    """`mlflow server` on loopback against the smoke run's store."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from pipelines.tracking import tracking_uri
    run_dir, _ = smoke
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(run_dir),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).read() == b"OK":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not come up in 60 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def chromium_path() -> str:
    """The browser `make test` installed (SDDIT_CHROMIUM, default Debian's); missing is a failure, not a skip."""
    path = os.environ.get("SDDIT_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).is_file():
        pytest.fail(f"{path} is missing: `make test` installs Debian's chromium (apt-get install chromium), or "
                    f"point SDDIT_CHROMIUM / make test CHROMIUM=... at a Chromium binary")
    return path


def assert_model_training_layout(page) -> None:
    """MLflow 3.17's Model training layout: its side bar has the model registry; the GenAI one has judges and
    titles a run page 'Evaluations'."""
    from playwright.sync_api import expect
    expect(page.get_by_text("Model registry", exact=True).first).to_be_visible(timeout=30_000)
    assert page.get_by_text("Judges", exact=True).count() == 0
    assert page.get_by_text("Evaluations", exact=True).count() == 0


def test_each_stage_run_lasts_as_long_as_the_stage(smoke):
    """A stage's MLflow run starts when the stage starts, so the UI's Duration is its wall time, not the moments
    its logging took (the summary's figure also holds full_run's own work around the stage)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    run_dir, summary = smoke
    client = MlflowClient(tracking_uri(run_dir))
    experiment = client.get_experiment_by_name("sddit")
    first = client.search_runs([experiment.experiment_id], "tags.`sddit.stage` = 'pipeline'",
                               order_by=["attributes.start_time ASC"])[0]     # the rerun test may add another
    assert first.info.run_id == summary["mlflow_run_id"]
    for stage, runs_of_stage in (("encode", 1), ("evaluate", 3)):        # evaluate: CFG 1, guided, untrained
        runs = client.search_runs([experiment.experiment_id], f"tags.`sddit.stage` = '{stage}' and "
                                  f"tags.`mlflow.parentRunId` = '{first.info.run_id}'")
        assert len(runs) == runs_of_stage
        seconds = sum((run.info.end_time - run.info.start_time) / 1000 for run in runs)
        assert 0.7 * summary["stages"][stage] <= seconds <= summary["stages"][stage] + 1, (stage, seconds)


def test_mlflow_ui_shows_the_pipeline_its_stages_a_chart_and_the_sample_grid(smoke, mlflow_server):
    """Headless Chromium (Debian's, driven by Playwright) on the real MLflow UI; screenshots are kept."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect, sync_playwright

    from pipelines.tracking import UI_QUERY

    artifacts = Path(__file__).resolve().parents[1] / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("sddit")
    # the first pipeline run (the rerun test may have added a second one)
    parent = client.search_runs([experiment.experiment_id], "tags.`sddit.stage` = 'pipeline'",
                                order_by=["attributes.start_time ASC"])[0]
    [train] = client.search_runs([experiment.experiment_id], "tags.`sddit.train_name` = 'final-demo'")
    base = f"{mlflow_server}/#/experiments/{experiment.experiment_id}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            # the link full_run prints opens the runs table (MLflow 3.17's "Model training" layout), not the
            # GenAI overview it shows by default; the experiment is also tagged as model training
            assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
            page.goto(f"{base}?{UI_QUERY}", wait_until="load")
            expect(page.get_by_text("full_run demo", exact=True).first).to_be_visible(timeout=60_000)
            assert "/runs" in page.url and "overview" not in page.url
            page.screenshot(path=str(artifacts / "mlflow_ui_experiment.png"))

            # the pipeline run's own link, as full_run prints it: the run page in the Model training layout
            page.goto(f"{base}/runs/{parent.info.run_id}?{UI_QUERY}", wait_until="load")
            expect(page.get_by_text("full_run demo", exact=True).first).to_be_visible(timeout=60_000)
            assert_model_training_layout(page)
            page.screenshot(path=str(artifacts / "mlflow_ui_pipeline_run.png"))

            # the pipeline run, expanded to show a child run per stage
            page.goto(f"{base}/runs?{UI_QUERY}", wait_until="load")
            expect(page.get_by_text("full_run demo", exact=True).first).to_be_visible(timeout=60_000)
            parent_row = page.get_by_role("row").filter(has=page.locator(f"a[href*='{parent.info.run_id}']"))
            parent_row.get_by_role("button").first.click()          # expand its child runs
            for child in ("encode", "sweep-demo", "train final-demo", "evaluate"):
                expect(page.get_by_text(child, exact=True).first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(artifacts / "mlflow_ui_runs.png"))

            # a click into a run: MLflow's own link drops the query, and its page is in the layout the browser
            # remembers; the once-per-browser choice the docs give ("Model training" at the top left) is kept
            # by every page reached by clicking from then on
            page.locator(f"a[href*='{train.info.run_id}']").first.click()
            expect(page.get_by_text("train final-demo", exact=True).first).to_be_visible(timeout=60_000)
            page.get_by_text("Model training", exact=True).first.click()
            assert_model_training_layout(page)
            page.goto(f"{base}/runs", wait_until="load")         # no query: the remembered choice alone
            page.locator(f"a[href*='{parent.info.run_id}']").first.click(timeout=60_000)
            expect(page.get_by_text("full_run demo", exact=True).first).to_be_visible(timeout=60_000)
            assert_model_training_layout(page)
            page.screenshot(path=str(artifacts / "mlflow_ui_clicked_run.png"))

            # a metric chart of the training run
            page.goto(f"{base}/runs/{train.info.run_id}/model-metrics?{UI_QUERY}", wait_until="load")
            expect(page.get_by_text("loss_gen", exact=True).first).to_be_visible(timeout=60_000)
            assert_model_training_layout(page)
            expect(page.locator("canvas, svg.main-svg").first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(artifacts / "mlflow_ui_metrics.png"))

            # the sample grid among the pipeline run's artifacts, rendered as an image
            page.goto(f"{base}/runs/{parent.info.run_id}/artifacts?{UI_QUERY}", wait_until="load")
            page.get_by_text("demo_samples.png", exact=True).first.click(timeout=60_000)
            image = page.locator("img[src^='blob:'], img[src*='demo_samples.png']").first   # fetched, then shown
            expect(image).to_be_visible(timeout=30_000)
            assert image.evaluate("img => img.naturalWidth") > 0
            page.screenshot(path=str(artifacts / "mlflow_ui_samples.png"))
        finally:
            browser.close()
