

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
