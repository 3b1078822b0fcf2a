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


def fake_ray(*node_cpus, dead=(), gpus=0):
    nodes = [{"Alive": True, "Resources": {"CPU": cpus}} for cpus in node_cpus]
    nodes += [{"Alive": False, "Resources": {"CPU": cpus}} for cpus in dead]
    return SimpleNamespace(nodes=lambda: nodes, cluster_resources=lambda: {"CPU": sum(node_cpus), "GPU": gpus})


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

    def agent_ports():
        """Each node's agents on free ports, so another Ray on the machine (Ray's defaults) cannot collide."""
        return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]

    nodes, logs = [], []

    def start_node(name: str, *options: str) -> subprocess.Popen:
        """`ray start --block` with its output in a log under the isolated HOME, so a failure can say why."""
        log = home / f"{name}-{len(logs)}.log"
        logs.append(log)
        with log.open("w") as out:
            node = subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                                     "--disable-usage-stats", *options, *agent_ports()],
                                    env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        nodes.append(node)
        return node

    def status(address: str) -> subprocess.CompletedProcess:
        return run([ray_bin, "status", "--address", address], env, check=False)

    try:
        # a port handed out by free_port() can be taken by someone else before Ray binds it: a head that
        # exits while starting is started once more on fresh ports
        for attempt in range(2):
            gcs, dashboard = free_port(), free_port()
            head = start_node("head", "--head", "--port", str(gcs), "--include-dashboard", "true",
                              "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                              "--temp-dir", str(temp_dirs[0]))
            if wait_for(lambda: status(f"127.0.0.1:{gcs}").returncode == 0, "the head node", process=head,
                        log=logs[-1], raise_on_exit=attempt == 1):
                break
            subprocess.run(["pkill", "-9", "-f", str(temp_dirs[0])], check=False)   # what the failed head left
        start_node("worker", "--address", f"127.0.0.1:{gcs}", "--temp-dir", str(temp_dirs[1]))
        wait_for(lambda: re.search(r"/2\.0 CPU", status(f"127.0.0.1:{gcs}").stdout), "the second node",
                 process=nodes[-1], log=logs[-1])
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


def wait_for(condition, what: str, timeout: float = 180, process: subprocess.Popen | None = None,
             log: Path | None = None, raise_on_exit: bool = True) -> bool:
    """Poll `condition` until it holds (True). If `process` exits first: False, or with `raise_on_exit` an
    error with the tail of its `log`; a timeout is an error with that tail too."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            if not raise_on_exit:
                return False
            raise AssertionError(f"{what} exited ({process.returncode}) while starting:\n{tail(log)}")
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail(log)}")


def tail(log: Path | None, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log is not None and log.exists() else "(no log)"


# ---------------------------------------------------------------------------------------------
# SLURM: infra/slurm/sddit.sbatch (defined before the loopback cluster test: `ray symmetric-run` refuses to
# start while any other Ray runtime runs on the machine)
# ---------------------------------------------------------------------------------------------

SBATCH = ROOT / "infra" / "slurm" / "sddit.sbatch"


def slurm_env(tmp_path, hosts: str, **settings) -> dict:
    """A SLURM-like environment: fake `scontrol` (the allocation's hostnames) and `srun` (runs the command
    once, here), and the variables sbatch sets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\nprintf '{hosts}\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\nexec \"$@\"\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "SLURM_", "SDDIT_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(ROOT),
               SDDIT_PYTHON=sys.executable, SHARED=str(tmp_path / "shared"), **settings)
    return env


def test_sbatch_script_builds_a_command_that_symmetric_run_and_full_run_accept(tmp_path):
    import shlex

    from ray.scripts.symmetric_run import curate_and_validate_ray_start_args, symmetric_run

    from pipelines.full_run import parse_args
    env = slurm_env(tmp_path, "node1\\nnode2", SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="64",
                    SLURM_GPUS_PER_NODE="a100:8", SDDIT_HEAD_IP="10.1.2.3", SDDIT_DRY_RUN="1",
                    SDDIT_RAY_START_ARGS="--temp-dir /scratch/ray")
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout)
    separator = command.index("--")
    ray_args, entrypoint = command[2:separator], command[separator + 1:]
    assert command[:2] == ["ray", "symmetric-run"]
    assert ray_args[:4] == ["--address", "10.1.2.3:6379", "--min-nodes", "2"]
    assert ray_args[4:] == ["--num-cpus", "64", "--num-gpus", "8", "--temp-dir", "/scratch/ray"]
    # what Ray's own parsers make of it: symmetric-run's options, then `ray start`'s for the rest
    context = symmetric_run.make_context("symmetric-run", ray_args, resilient_parsing=True)
    assert (context.params["address"], context.params["min_nodes"]) == ("10.1.2.3:6379", 2)
    start_args = curate_and_validate_ray_start_args(ray_args)
    start_help = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--help"], capture_output=True,
                                text=True, timeout=60).stdout
    assert all(f"{option} " in start_help or f"{option}\n" in start_help
               for option in start_args if option.startswith("--"))
    assert entrypoint[:2] == [sys.executable, "pipelines/full_run.py"]
    args = parse_args(entrypoint[2:])
    assert args.cluster and args.preset == "imagenet256-XL2" and args.storage == str(tmp_path / "shared" / "sddit")
    assert not (tmp_path / "shared").exists()                            # a dry run writes nothing


def test_sbatch_script_refuses_to_run_outside_slurm(tmp_path):
    env = slurm_env(tmp_path, "node1")
    done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "SLURM_JOB_NUM_NODES" in done.stderr


@pytest.mark.slow
def test_sbatch_script_runs_its_entrypoint_on_a_one_node_symmetric_run_cluster(tmp_path):
    """The script for real on this host as a one-node allocation: symmetric-run starts the head, the
    entrypoint connects to it with the token from shared storage, then the cluster is stopped."""
    from ray._private.services import find_gcs_addresses
    assert not find_gcs_addresses(), "another Ray runtime is running here; ray symmetric-run refuses to start"
    probe = tmp_path / "probe.py"
    probe.write_text("import json, os, sys, ray\nray.init(address='auto')\n"
                     "json.dump({'cpus': ray.cluster_resources().get('CPU'), 'nodes': len(ray.nodes()), "
                     "'auth': os.environ.get('RAY_AUTH_MODE')}, open(sys.argv[1], 'w'))\n")
    temp_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    env = slurm_env(tmp_path, "localhost", SLURM_JOB_NUM_NODES="1", SLURM_CPUS_PER_TASK="1",
                    SDDIT_HEAD_IP="127.0.0.1", RAY_PORT=str(free_port()), HOME=str(tmp_path / "home"),
                    SDDIT_ENTRYPOINT=f"{sys.executable} {probe} {tmp_path / 'probe.json'}",
                    SDDIT_RAY_START_ARGS=f"--temp-dir {temp_dir} --disable-usage-stats "
                                         f"--include-dashboard false")
    try:
        done = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json
    assert json.loads((tmp_path / "probe.json").read_text()) == {"cpus": 1.0, "nodes": 1, "auth": "token"}
    token = tmp_path / "shared" / "sddit" / "ray_auth_token"
    assert token.stat().st_mode & 0o077 == 0 and len(token.read_text()) == 32
    assert "On head node" in done.stdout


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


@pytest.mark.parametrize("node_cpus, workers_per_trial, max_concurrent, expected", [
    ((2,), 1, None, (2, 1)),      # by default as many trials as there are CPUs, one CPU each
    ((8,), 2, None, (4, 1)),
    ((8,), 1, 2, (2, 4)),         # fewer trials than CPUs: the CPUs shared among them
    ((2,), 1, 4, (4, 0.5)),       # asked for more trials than CPUs: fractional shares, all start at once
    ((2,), 2, 2, (2, 0.5)),
])
def test_trial_resources_share_the_cpus_among_the_concurrent_trials(node_cpus, workers_per_trial, max_concurrent,
                                                                    expected):
    from pipelines.trials import trial_resources
    concurrent, cpus, gpus = trial_resources(fake_ray(*node_cpus), workers_per_trial, 0, max_concurrent)
    assert (concurrent, cpus) == expected and gpus == 0


def test_trial_resources_never_oversubscribe_gpus():
    from sddit.errors import ConfigError
    from pipelines.trials import trial_resources
    assert trial_resources(fake_ray(16, gpus=2), 1, 1, 8)[:1] == (2,)
    with pytest.raises(ConfigError, match="gpus_per_trial"):
        trial_resources(fake_ray(16, gpus=1), 1, 2, None)
