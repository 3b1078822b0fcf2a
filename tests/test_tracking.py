

def test_each_run_dir_gets_its_own_store_even_after_mlflow_exported_one(tmp_path, monkeypatch):
    import mlflow

    import pipelines.tracking as tracking
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", None)
    first = tracking.tracking_uri(tmp_path / "a")
    mlflow.set_tracking_uri(first)                         # exports MLFLOW_TRACKING_URI as a side effect
    assert tracking.tracking_uri(tmp_path / "b") == f"sqlite:///{(tmp_path / 'b').resolve()}/mlflow.db"
    assert first.startswith("sqlite:////") and first.endswith("/a/mlflow.db")   # absolute


def test_a_user_tracking_uri_wins(monkeypatch, tmp_path):
    import pipelines.tracking as tracking
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri(tmp_path) == "http://mlflow.example:5000"


def test_a_killed_pipeline_run_is_found_and_its_stages_are_continued_not_repeated(tmp_path, monkeypatch):
    import mlflow

    import pipelines.tracking as tracking
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", None)
    tracking.use_store(tracking.tracking_uri(tmp_path))
    tags = {"sddit.stage": "pipeline", "sddit.pipeline_key": tracking.params_key({"preset": "demo"})}
    assert tracking.unfinished_run(tags) is None
    parent = mlflow.start_run(run_name="full_run demo", tags=tags)     # never ended: as after kill -9
    monkeypatch.setenv(tracking.PARENT_ENV, parent.info.run_id)
    for value in (1, 1, 2):                                 # the same stage twice, then with other parameters
        with tracking.stage_run("encode", tmp_path, params={"resolution": value}):
            mlflow.log_metric("rows", value)
    assert tracking.unfinished_run(tags).info.run_id == parent.info.run_id
    assert tracking.unfinished_run({**tags, "sddit.pipeline_key": "other"}) is None
    children = mlflow.search_runs(filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  output_format="list")
    assert sorted(c.data.params["resolution"] for c in children) == ["1", "2"]
    mlflow.end_run()
    assert tracking.unfinished_run(tags) is None            # a finished pipeline starts a new run next time


def test_a_stage_run_spans_the_stage_from_when_it_started_not_from_when_it_logged(tmp_path, monkeypatch):
    import time

    import mlflow

    import pipelines.tracking as tracking
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", None)
    tracking.use_store(tracking.tracking_uri(tmp_path))
    parent = mlflow.start_run(run_name="full_run demo")
    started = time.time() - 42.0                             # the stage's work took 42 s before it logged
    with tracking.stage_run("evaluate", tmp_path, params={"cfg": 1}, parent_run_id=parent.info.run_id,
                            started=started) as run:
        mlflow.log_metric("fid", 3.0)
    mlflow.end_run()
    logged = mlflow.MlflowClient().get_run(run.info.run_id)
    assert logged.info.status == "FINISHED" and logged.data.params == {"cfg": "1"}
    assert logged.data.tags["mlflow.parentRunId"] == parent.info.run_id and logged.info.run_name == "evaluate"
    assert logged.info.start_time == int(started * 1000)
    assert abs((logged.info.end_time - logged.info.start_time) / 1000 - 42.0) < 1.0
