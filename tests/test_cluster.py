"""A real multi-node Ray cluster on loopback: `ray start` a head and a second node with token
authentication on, then `ray job submit` the smoke demo through full_run --cluster."""
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.common import cpus_per_worker

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--sweep-samples", "2", "--sweep-budget", "8", "--train-steps", "8", "--eval-samples", "30",
         "--eval-steps", "4"]


def fake_ray(*node_cpus, dead=()):
    nodes = [{"Alive": True, "Resources": {"CPU": cpus}} for cpus in node_cpus]
    nodes += [{"Alive": False, "Resources": {"CPU": cpus}} for cpus in dead]
    return SimpleNamespace(nodes=lambda: nodes)


@pytest.mark.parametrize("node_cpus, workers, expected", [
    ((2,), 1, 2),             # one node: the whole node
    ((1, 1), 1, 1),           # two 1-CPU nodes: a 2-CPU worker would never be scheduled
    ((3, 1), 2, 1),           # 2 + 2 does not fit (the 1-CPU node), 1 + 1 does
    ((4, 4), 2, 4),
    ((8, 8, 2), 4, 4),
    ((2,), 4, 1),             # more workers than CPUs: 1 each, Ray queues the rest
])
def test_cpus_per_worker_fits_every_worker_on_some_node(node_cpus, workers, expected):
    assert cpus_per_worker(fake_ray(*node_cpus, dead=(64,)), workers) == expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command, env, timeout=120, check=True):
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture
def loopback_cluster():
    """A head (1 CPU) and a second node (1 CPU) on 127.0.0.1, token auth on, isolated HOME and temp dir."""
    home = Path(tempfile.mkdtemp(prefix="sddit-home-"))
    # one temp dir per node, as on separate machines (a shared one lets a node's runtime-env cleanup
    # delete the job's unpacked working dir under the other); short paths: Ray's sockets live there
    temp_dirs = [Path(tempfile.mkdtemp(prefix="rc", dir="/tmp")) for _ in range(2)]
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    run([ray_bin, "get-auth-token", "--generate"], env)
    gcs, dashboard = free_port(), free_port()

    def agent_ports():
        """Each node's agents on free ports, so another Ray on the machine (Ray's defaults) cannot collide."""
        return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]

    nodes = []
    try:
        nodes.append(subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--num-cpus", "1", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard), "--temp-dir", str(temp_dirs[0]), "--disable-usage-stats",
             *agent_ports()],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: run([ray_bin, "status", "--address", f"127.0.0.1:{gcs}"], env, check=False).returncode == 0,
                 "the head node")
        nodes.append(subprocess.Popen(
            [ray_bin, "start", "--block", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
             "--num-cpus", "1", "--temp-dir", str(temp_dirs[1]), "--disable-usage-stats", *agent_ports()],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: re.search(r"/2\.0 CPU", run([ray_bin, "status", "--address", f"127.0.0.1:{gcs}"], env,
                                                     check=False).stdout), "the second node")
        yield SimpleNamespace(env=env, ray=ray_bin, address=f"http://127.0.0.1:{dashboard}", home=home)
    finally:
        for node in reversed(nodes):
            node.terminate()
        for node in reversed(nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        # anything the nodes left behind is recognisable by the nodes' own temp dirs
        for temp_dir in temp_dirs:
            subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)
            shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_ray_job_submit_runs_the_smoke_demo_on_a_two_node_cluster(loopback_cluster, tmp_path):
    cluster = loopback_cluster
    submit = [cluster.ray, "job", "submit", "--address", cluster.address, "--working-dir", "."]

    # token auth is really on: a client without the token is turned away
    anonymous = {**cluster.env, "RAY_AUTH_MODE": "disabled"}
    refused = run(submit + ["--", "python", "-c", "print(1)"], anonymous, check=False)
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()

    # with the token (RAY_AUTH_MODE=token and ~/.ray/auth_token), the whole pipeline runs as a job
    storage = tmp_path / "shared"
    command = submit + ["--submission-id", "sddit-smoke", "--", "python", "pipelines/full_run.py", "--cluster",
                        "--storage", str(storage), "--run-dir", str(storage / "runs")] + SMOKE
    deadline = time.time() + 180
    while True:   # on a loaded machine the head's job agent can come up after `ray status` answers
        job = run(command, cluster.env, timeout=900, check=False)
        if "No available agent to submit job" not in job.stderr or time.time() > deadline:
            break
        time.sleep(5)
    status = run([cluster.ray, "job", "status", "--address", cluster.address, "sddit-smoke"], cluster.env, check=False)
    assert status.returncode == 0, f"submit: {job.stdout[-3000:]}\n{job.stderr[-3000:]}\nstatus: {status.stderr[-1000:]}"
    assert "Job 'sddit-smoke' succeeded" in status.stdout, job.stdout[-4000:] + job.stderr[-4000:]
    assert "=== sddit full_run summary ===" in job.stdout

    # the job's MLflow store: one pipeline run with a child per stage
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    client = MlflowClient(tracking_uri(storage / "runs"))
    experiment = client.get_experiment_by_name("sddit")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`sddit.stage` = 'pipeline'")
    assert parent.info.status == "FINISHED" and parent.data.params["cluster"] == "True"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(child.data.tags["sddit.stage"] for child in children) == [
        "encode", "evaluate", "evaluate", "evaluate", "train", "tune"]
    assert all(child.info.status == "FINISHED" for child in children)
