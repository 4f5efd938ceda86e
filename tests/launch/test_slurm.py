"""`gigatrain launch slurm`: the script it writes, and one real job on a one-node Slurm cluster."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, run_cli
from gigatrain.cli import run
from gigatrain.launch import slurm
from gigatrain.rundir import RunDir

CONFIG = REPO / "configs" / "tiny.toml"


def launch(capsys, *args: str) -> tuple[int, str, str]:
    """`gigatrain launch ARGS`, in this process: exit code, stdout, stderr."""
    code = run(["launch", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def render(capsys, run_dir: Path, *extra: str, nodes: int = 2, gpus: int = 4) -> str:
    code, out, err = launch(capsys, "slurm", "--nodes", str(nodes), "--gpus-per-node", str(gpus), str(CONFIG),
                            f"--run.dir={run_dir}", "--train.batch_size=32", "--out", "-", *extra)
    assert code == 0, err
    return out


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[key] = value
    return options


def test_script_is_valid_bash_with_the_job_header(capsys, tmp_path):
    script = render(capsys, tmp_path / "run", "--partition", "gpu", "--time", "1-12:00:00", "--max-restarts", "2")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert script.startswith("#!/bin/bash\n")
    logs = RunDir(tmp_path / "run").launch
    assert sbatch_options(script) == {
        "--job-name": "gigatrain-default", "--nodes": "2", "--ntasks-per-node": "1", "--gpus-per-node": "4",
        "--cpus-per-task": str(4 * slurm.CPUS_PER_GPU), "--partition": "gpu", "--time": "1-12:00:00",
        "--signal": f"B:USR1@{slurm.WARNING_S}", "--requeue": "", "--open-mode": "append", "--chdir": str(Path.cwd()),
        "--output": f"{logs}/slurm-%j.out", "--error": f"{logs}/slurm-%j.err"}
    assert logs.is_dir()  # Slurm cannot create the log folder itself
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert "--max-restarts=2" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def run_script_with_recording_srun(tmp_path: Path, script: str) -> list[str]:
    """Run the script's body under bash, with `scontrol` answering two hostnames and `srun`
    recording the argument list it receives: what torchrun would be started with, after
    the shell has expanded and unquoted every word."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun_args.json"
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                  f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242"}
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "rendezvous on node-a:" in result.stdout
    return json.loads(record.read_text())


def test_torchrun_line_reaches_srun_word_for_word(capsys, tmp_path):
    overrides = ["--run.name=two words\n$(touch pwned)", "--train.lr=3e-4", "--data.path=/data/it's here"]
    script = render(capsys, tmp_path / "run", "--port", "29611", "--max-restarts", "5", *overrides)
    args = run_script_with_recording_srun(tmp_path, script)
    assert args == ["--kill-on-bad-exit=1", f"--cpus-per-task={4 * slurm.CPUS_PER_GPU}", *slurm.launcher(),
                    "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node-a:29611",
                    "--rdzv-id=4242", "--max-restarts=5", "-m", "gigatrain", "train", str(CONFIG),
                    f"--run.dir={tmp_path / 'run'}", "--train.batch_size=32", *overrides]
    assert not (tmp_path / "pwned").exists() and not (Path.cwd() / "pwned").exists()


def test_torchrun_is_the_one_beside_this_python():
    """The job must run in gigatrain's own environment, not whatever torchrun is on PATH."""
    assert slurm.launcher("/opt/env/bin/python") == ["/opt/env/bin/python", "-m", "torch.distributed.run"]
    beside = Path(sys.executable).parent / "torchrun"
    assert slurm.launcher() == ([str(beside)] if beside.is_file() else [sys.executable, "-m", "torch.distributed.run"])


def test_cpu_processes_instead_of_gpus(capsys, tmp_path):
    script = render(capsys, tmp_path / "run", "--cpu", "--run.name=cpu job", nodes=1, gpus=2)
    options = sbatch_options(script)
    assert "--gpus-per-node" not in options
    assert options["--cpus-per-task"] == "2" and options["--job-name"] == "gigatrain-cpu-job"
    assert "export OMP_NUM_THREADS=1" in script
    assert 'if [ "$status" = 75 ]; then' in script  # the trainer's requeue code requeues the job
    srun_command = re.search(r"^srun .*? &$", script, re.M | re.S).group(0)
    assert shlex.split(srun_command.replace("\\\n", ""))[-2:] == ["--train.device=cpu", "&"]


def test_default_output_is_in_the_run_directory(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "1", str(CONFIG), f"--run.dir={run_dir}")
    assert code == 0, err
    script = RunDir(run_dir).launch / "slurm.sbatch"
    assert out.strip() == f"wrote {script}; start it with: sbatch {script}"
    assert "--nproc-per-node=1" in script.read_text()


@pytest.mark.parametrize("args, words", [
    (["--nodes", "0", "--gpus-per-node", "8"], ["--nodes=0", "at least 1"]),
    (["--nodes", "2", "--gpus-per-node", "0"], ["--gpus-per-node=0"]),
    (["--nodes", "two", "--gpus-per-node", "8"], ["--nodes", "two"]),
    (["--nodes", "1", "--gpus-per-node", "8", "--max-restarts", "-1"], ["--max-restarts=-1"]),
    (["--nodes", "1", "--gpus-per-node", "8", "--port", "80"], ["--port=80"]),
    (["--nodes", "1", "--gpus-per-node", "8", "--time", "forever"], ["--time", "forever"]),
    (["--nodes", "1", "--gpus-per-node", "8", "--job-name", "my job"], ["job-name", "my job"]),
    (["--nodes", "1", "--gpus-per-node", "8", "--cpus-per-task", "4"], ["--cpus-per-task=4", "at least 8"]),
    (["--nodes", "1", "--gpus-per-node", "8", "--train.lrr=1"], ["train.lrr"]),
    (["--nodes", "2", "--gpus-per-node", "4", "--parallel.dp_shard=3"], ["dp_shard=3", "nodes x gpus-per-node = 8 processes"]),
    (["--nodes", "2", "--gpus-per-node", "4", "--parallel.dp_shard=-1", "--parallel.tp=3"],
     ["parallel.dp_shard=-1", "tp=3", "8 processes"]),
    (["--nodes", "1", "--gpus-per-node", "2", "--cpu", "--train.device=cuda"], ["--cpu", "train.device=cuda"]),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, args, words):
    code, out, err = launch(capsys, "slurm", *args, str(CONFIG), f"--run.dir={tmp_path / 'run'}")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_bad_input_from_the_command_line(tmp_path):
    """As a user meets it: a subprocess, a missing config, one line, exit 2."""
    for args, word in ((["launch", "slurm", "--nodes", "1", "--gpus-per-node", "1", "missing.toml"], "missing.toml"),
                       (["launch"], "TARGET"),
                       (["launch", "lsf", "--nodes", "1"], "lsf")):
        result = run_cli(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert word in result.stderr and "Traceback" not in result.stderr


def test_a_batch_that_does_not_split_over_the_nodes_names_the_sizes_that_do(capsys, tmp_path):
    """The 1B GPU config keeps its one-GPU batch (16, micro-batch 4); on 4 x 8 GPUs the error
    says which global batch sizes split into micro-batches of 4 on 32 ranks."""
    args = ["slurm", "--nodes", "4", "--gpus-per-node", "8", str(REPO / "configs" / "llama3-1b-gpu.toml"),
            f"--run.dir={tmp_path / 'run'}", "--out", "-"]
    code, _, err = launch(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "train.batch_size can be 128 or 256" in err, err
    code, out, err = launch(capsys, *args, "--train.batch_size=128")
    assert code == 0 and "--train.batch_size=128" in out, err


# -- a real Slurm cluster of one node -------------------------------------------------------
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE")
SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "munge")


def install_slurm() -> None:
    """Debian's Slurm and MUNGE, when missing; skipped only where nothing can be installed."""
    if all(shutil.which(tool) for tool in SLURM_TOOLS):
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm/MUNGE are not installed and installing them (apt-get install slurm-wlm munge) needs root")
    if not shutil.which("apt-get"):
        pytest.skip("Slurm/MUNGE are not installed and this machine has no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "slurm-wlm", "munge"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    missing = [tool for tool in SLURM_TOOLS if not shutil.which(tool)]
    assert not missing, f"installed slurm-wlm and munge, but {missing} are still missing"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def this_node() -> str:
    """This machine's CPUs, sockets and memory as slurmd sees them, minus its name and uptime."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return " ".join(word for word in line.split() if not word.startswith(("NodeName=", "UpTime=")))


class LocalSlurm:
    """munged, slurmctld and slurmd in the foreground, configured and logging in one folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.jobs: list[str] = []

    def write_conf(self) -> None:
        socket_path = self.folder / "munge.socket"
        for name in ("state", "spool"):
            (self.folder / name).mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=gigatrain-test",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            # Our own munged; a requeued job may start cred_expire seconds later (default 120).
            f"AuthInfo=socket={socket_path},cred_expire=10",
            "CredType=cred/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            f"StateSaveLocation={self.folder / 'state'}",
            f"SlurmdSpoolDir={self.folder / 'spool'}",
            f"SlurmctldPidFile={self.folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.folder / 'slurmctld.log'}",
            f"SlurmdLogFile={self.folder / 'slurmd.log'}",
            f"NodeName=localhost NodeAddr=127.0.0.1 {this_node()} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start_daemon(self, name: str, *command: str) -> None:
        log = open(self.folder / f"{name}.out", "w")
        self.daemons.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)))

    def start(self) -> None:
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.folder.chmod(0o711)  # munged wants its socket's folder searchable by all
        self.start_daemon("munged", "munged", "--foreground", "--force", f"--socket={self.folder / 'munge.socket'}",
                          f"--key-file={key}", f"--log-file={self.folder / 'munged.log'}",
                          f"--pid-file={self.folder / 'munged.pid'}", f"--seed-file={self.folder / 'munged.seed'}")
        self.wait_for(lambda: (self.folder / "munge.socket").exists(), 10, "munged to create its socket")
        self.write_conf()
        self.start_daemon("slurmctld", "slurmctld", "-D", "-c", "-i", "-f", str(self.conf))
        self.start_daemon("slurmd", "slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
        self.wait_for(lambda: self.slurm("sinfo", "-h", "-N", "-o", "%T", check=False).strip() == "idle", 60,
                      "the node to be idle in sinfo")

    def wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, process in self.daemons:
                assert process.poll() is None, f"{name} exited:\n{(self.folder / f'{name}.out').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
            time.sleep(0.2)

    def slurm(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=30)
        if check:
            assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def submit(self, script: Path) -> str:
        job = self.slurm("sbatch", "--parsable", str(script)).strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as KEY=VALUE pairs."""
        text = self.slurm("scontrol", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def stop(self) -> None:
        """Cancel our jobs, then end the daemons we started, newest first."""
        if self.jobs:
            self.slurm("scancel", *self.jobs, check=False)
            deadline = time.monotonic() + 30
            while self.slurm("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name, process in reversed(self.daemons):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


@pytest.fixture
def local_slurm(tmp_path):
    install_slurm()
    cluster = LocalSlurm(tmp_path / "slurm")
    cluster.folder.mkdir()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def training_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in RunDir(run_dir).metrics_records() if "loss" in record]


@pytest.mark.integration
@pytest.mark.slow
def test_slurm_job_trains_on_two_processes_and_survives_a_time_limit_warning(local_slurm, tmp_path, byte_data):
    """sbatch the generated script on a one-node cluster: two CPU processes train; Slurm's
    time-limit warning (SIGUSR1 to the batch shell) makes them checkpoint, the job requeues
    itself and resumes from that checkpoint, and finishes COMPLETED."""
    run_dir, max_steps = tmp_path / "run", 200
    config = tmp_path / "tiny.toml"
    config.write_text(f'[model]\npreset = "tiny"\n\n[data]\npath = "{byte_data}"\n')
    generated = run_cli("launch", "slurm", "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--max-restarts", "0",
                        str(config), *TINY, f"--train.max_steps={max_steps}", "--train.checkpoint_every=100000",
                        "--train.eval_every=100000", f"--run.dir={run_dir}", check=True)
    script = RunDir(run_dir).launch / "slurm.sbatch"
    assert f"sbatch {script}" in generated.stdout
    job_id = local_slurm.submit(script)

    deadline = time.monotonic() + 90
    while len(training_steps(run_dir)) < 3:
        assert local_slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), local_slurm.job(job_id)
        assert time.monotonic() < deadline, "the job did not start training within 90 s"
        time.sleep(0.2)
    local_slurm.slurm("scancel", "--batch", "--signal=USR1", job_id)  # what Slurm sends WARNING_S before the limit

    deadline = time.monotonic() + 180
    while (state := local_slurm.job(job_id))["JobState"] not in FINAL_STATES:
        assert time.monotonic() < deadline, f"the job did not finish within 180 s: {state}"
        time.sleep(0.5)
    log = (RunDir(run_dir).launch / f"slurm-{job_id}.out").read_text()
    errors = (RunDir(run_dir).launch / f"slurm-{job_id}.err").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{log[-2000:]}\n{errors[-4000:]}"
    assert state["Restarts"] == "1", state

    # The warning stopped training at a checkpoint; the requeued job resumed from it.
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", log)
    assert stopped, log[-3000:]
    assert f"resumed at step {stopped.group(1)}" in log
    assert log.count("2 processes: ") == 2 and RunDir(run_dir).read_run_info()["world_size"] == 2
    latest = (RunDir(run_dir).checkpoints / "latest").read_text().strip()
    state_file = RunDir(run_dir).checkpoints / latest / "trainer_state.json"
    assert json.loads(state_file.read_text())["step"] == max_steps
    assert (RunDir(run_dir).checkpoints / f"step_{int(stopped.group(1)):08d}" / "trainer_state.json").exists()
    assert training_steps(run_dir) == list(range(1, max_steps + 1))


def test_replica_groups_run_as_steps_of_their_own_beside_the_lighthouse(capsys, tmp_path):
    """fault.recovery=replica: the Lighthouse as a step on the first node, then one step per
    replica group on its own nodes, each a torchrun meeting on its own first node, told its
    group and where the Lighthouse is."""
    script = render(capsys, tmp_path / "run", "--fault.recovery=replica", "--fault.replica_groups=2", nodes=4, gpus=2)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sruns.jsonl"
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'n1\\nn2\\nn3\\nn4\\n'\n")
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                  f"open({str(record)!r}, 'a').write(json.dumps([os.environ.get('TORCHFT_LIGHTHOUSE'), "
                                  f"os.environ.get('REPLICA_GROUP_ID'), *sys.argv[1:]]) + '\\n')\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NNODES": "4",
           "SLURM_JOB_ID": "77"}
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    lighthouse = [c for c in calls if any(word.endswith("torchft_lighthouse") for word in c[2:])]
    groups = sorted((c for c in calls if c not in lighthouse), key=lambda c: c[1])
    assert len(lighthouse) == 1 and len(groups) == 2
    assert lighthouse[0][-8:] == ["--min_replicas", "1", "--quorum_tick_ms", "100", "--join_timeout_ms", "10000",
                                  "--bind", "[::]:29510"]
    assert "--nodelist=n1" in lighthouse[0]
    for group, (url, group_id, *args) in enumerate(groups):
        assert (url, group_id) == ("http://n1:29510", str(group))
        nodes = ["n1", "n2"] if group == 0 else ["n3", "n4"]
        assert f"--nodelist={','.join(nodes)}" in args and "--nodes=2" in args
        assert f"--rdzv-endpoint={nodes[0]}:29500" in args and f"--rdzv-id=77-replica{group}" in args
        assert "--nnodes=2" in args and "--nproc-per-node=2" in args
        assert "--fault.recovery=replica" in args
        assert args[-2:] == ["--fault.replica_groups=2", f"--fault.replica_id={group}"]
    # Nodes that do not split into the groups: one line, exit 2.
    code, out, err = launch(capsys, "slurm", "--nodes", "3", "--gpus-per-node", "2", str(CONFIG),
                            f"--run.dir={tmp_path / 'run'}", "--fault.recovery=replica", "--out", "-")
    assert code == 2 and "--nodes=3 cannot be split into fault.replica_groups=2" in err
