"""An sbatch script: one srun task per node, each a torchrun starting the node's processes.

The nodes meet through torchrun's c10d rendezvous on the job's first node. Slurm warns the
job WARNING_S seconds before its time limit with SIGUSR1, delivered to the batch shell
only (`--signal=B:...`): the trainer takes SIGTERM and SIGUSR1 alike as "checkpoint, stop
and exit 75 (requeue)", but SIGUSR1 would kill torchrun outright. So the shell sends SIGTERM
to the job's steps (`scancel --signal=TERM`), which torchrun passes to its workers, waits
for the checkpoint, and requeues the job, which resumes from it. The shell also requeues
when the step itself exits with the requeue code. A pre-emption's SIGTERM reaches every
process directly and Slurm requeues the job itself (`--requeue`).

With fault.recovery=replica the script starts torchft's Lighthouse as a step of its own on the
first node, then one step per replica group on its own nodes (nodes / R each), each a torchrun
with its own rendezvous, TORCHFT_LIGHTHOUSE and `--fault.replica_groups=R
--fault.replica_id=i`: a group whose step fails is restarted by its own torchrun while the other
groups train on.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from gigatrain.fault import EXIT_REQUEUE
from gigatrain.launch import (LIGHTHOUSE_PORT, Job, LaunchError, lighthouse_args, replica_groups, replica_overrides,
                              require_match)
from gigatrain.rundir import RunDir

WARNING_S = 120  # SIGUSR1 this long before the time limit
SHUTDOWN_S = 100  # torchrun's wait for its workers to checkpoint before SIGKILL, inside WARNING_S
CPUS_PER_GPU = 8  # default --cpus-per-task per GPU: the driving process plus data and NCCL threads

# Slurm's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; UNLIMITED.
TIME = r"(\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE)"
# #SBATCH lines are parsed by sbatch, not the shell: keep their values free of quoting, and
# of %, which Slurm expands in file names.
SBATCH_VALUE = r"[A-Za-z0-9._,:@/+=-]+"


def launcher(python: str = sys.executable) -> list[str]:
    """torchrun of the Python that runs gigatrain (a venv's own), so the job uses the same
    environment; `python -m torch.distributed.run` where there is no torchrun beside it."""
    torchrun = Path(python).parent / "torchrun"
    if torchrun.is_file():
        return [str(torchrun)]
    return [python, "-m", "torch.distributed.run"]


def default_name(run_name: str) -> str:
    """gigatrain-<run name>, with what #SBATCH lines cannot carry replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "gigatrain-" + run_name)


def default_cpus_per_task(job: Job) -> int:
    return job.procs_per_node * (1 if job.cpu else CPUS_PER_GPU)


def _sbatch_value(what: str, value: str) -> str:
    require_match(what, value, SBATCH_VALUE, "Slurm's #SBATCH lines take letters, digits and ._,:@/+=- only")
    return value


def sbatch_options(job: Job, run_dir: Path, workdir: Path, partition: str | None, time: str | None,
                   cpus_per_task: int) -> list[str]:
    if time is not None and not re.fullmatch(TIME, time):
        raise LaunchError(f"--time {time!r} is not valid; use HH:MM:SS, MM, or D-HH:MM:SS")
    logs = RunDir(run_dir).launch
    options = [f"--job-name={_sbatch_value('--job-name', job.name)}",
               f"--nodes={job.nodes}",
               "--ntasks-per-node=1"]  # one torchrun per node; it starts the node's processes
    if not job.cpu:
        options.append(f"--gpus-per-node={job.procs_per_node}")
    options.append(f"--cpus-per-task={cpus_per_task}")
    if partition:
        options.append(f"--partition={_sbatch_value('--partition', partition)}")
    if time:
        options.append(f"--time={time}")
    options += [f"--signal=B:USR1@{WARNING_S}",
                "--requeue",
                "--open-mode=append",  # a requeued job appends to the same log
                f"--chdir={_sbatch_value('the working directory', str(workdir))}",
                f"--output={_sbatch_value('the run directory', str(logs))}/slurm-%j.out",
                f"--error={logs}/slurm-%j.err"]
    return options


def _continued(lines: list[list[str]], indent: str = "    ") -> str:
    """Shell words, one group per line, joined with backslash continuations."""
    return (" \\\n" + indent).join(" ".join(words) for words in lines if words)


def render(job: Job, *, run_dir: Path, workdir: Path, partition: str | None = None, time: str | None = None,
           cpus_per_task: int | None = None, torchrun: list[str] | None = None, command_line: str = "") -> str:
    """The sbatch script. `run_dir` and `workdir` should be absolute: the job starts elsewhere."""
    cpus = cpus_per_task if cpus_per_task is not None else default_cpus_per_task(job)
    if cpus < job.procs_per_node:
        raise LaunchError(f"--cpus-per-task={cpus} is not valid; each node runs {job.procs_per_node} processes, "
                          f"so it needs at least {job.procs_per_node}")
    quote = shlex.quote
    devices = "CPU processes (gloo)" if job.cpu else "GPUs"
    header = ["#!/bin/bash",
              "# Generated by: " + (command_line.replace("\r", "\\r").replace("\n", "\\n") or "gigatrain launch slurm"),
              f"# {job.nodes} node(s) x {job.procs_per_node} {devices} = {job.world_size} processes; "
              f"run directory {run_dir}",
              *(f"#SBATCH {option}" for option in sbatch_options(job, run_dir, workdir, partition, time, cpus))]
    srun = [["srun", "--kill-on-bad-exit=1", f"--cpus-per-task={cpus}"],  # srun no longer inherits it (Slurm 22.05)
            [quote(word) for word in (torchrun or launcher())],
            ['--nnodes="$SLURM_NNODES"', f"--nproc-per-node={job.procs_per_node}", "--rdzv-backend=c10d"],
            [f'--rdzv-endpoint="$head_node:{job.port}"', '--rdzv-id="$SLURM_JOB_ID"', f"--max-restarts={job.max_restarts}"],
            [quote(word) for word in job.train_args()[:4]],
            *([quote(override)] for override in job.overrides)]
    groups = replica_groups(job.cfg)
    if groups == 1:
        steps = f"""{_continued(srun)} &
srun_pids=($!)"""
    else:
        steps = _replica_steps(job, groups, cpus, torchrun or launcher())
    body = f"""
set -uo pipefail  # not -e: srun's exit status is collected below, after any signal

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export OMP_NUM_THREADS={max(1, cpus // job.procs_per_node)}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={SHUTDOWN_S}
export PYTHONUNBUFFERED=1  # the log shows each step as it happens, and survives a killed process
echo "gigatrain: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_NNODES node(s) $SLURM_JOB_NODELIST; rendezvous on $head_node:{job.port}"

# SIGTERM makes every trainer finish its step, save a checkpoint and exit {EXIT_REQUEUE}. SIGUSR1 is
# Slurm's warning {WARNING_S} s before the time limit: stop the same way, then requeue to resume.
requeue=0
stop_training() {{
    echo "gigatrain: $1: asking the trainers to save a checkpoint and stop" >&2
    # SIGTERM to every process of the job's steps, torchrun and its workers alike (not to
    # this shell). Not `kill srun`: srun answers SIGTERM by killing its tasks outright.
    scancel --signal=TERM "$SLURM_JOB_ID"
}}
trap 'requeue=1; stop_training "time-limit warning (SIGUSR1)"' USR1
trap 'stop_training SIGTERM' TERM

{steps}
# A trapped signal interrupts `wait`; keep waiting until each srun itself has exited. The job's
# status is the first non-zero one (a replica group's torchrun gives up only when out of restarts).
status=0
for srun_pid in "${{srun_pids[@]}}"; do
    while kill -0 "$srun_pid" 2>/dev/null; do
        wait "$srun_pid"
    done
    wait "$srun_pid"
    code=$?
    if [ "$status" = 0 ]; then
        status=$code
    fi
done
{'kill "$lighthouse_pid" 2>/dev/null  # the groups are done: the Lighthouse has no one left to serve' if groups > 1 else ''}
if [ "$status" = {EXIT_REQUEUE} ]; then
    requeue=1  # the trainer checkpointed and asked to be run again
fi
if [ "$requeue" = 1 ]; then
    echo "gigatrain: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint in {quote(str(run_dir))}" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""
    return "\n".join(header) + "\n" + body


def _replica_steps(job: Job, groups: int, cpus: int, torchrun: list[str]) -> str:
    """The Lighthouse's step on the first node, then one step per replica group on its own
    nodes; each group's torchrun meets on its own first node and restarts alone."""
    quote = shlex.quote
    per_group = job.nodes // groups
    beside = Path(torchrun[0]).parent / "torchft_lighthouse"  # torchft's, in the same environment
    lighthouse = [str(beside) if beside.is_file() else "torchft_lighthouse", *lighthouse_args()[1:]]
    srun = [["srun", "--kill-on-bad-exit=1", "--overlap", f"--cpus-per-task={cpus}", f"--nodes={per_group}",
             f"--ntasks={per_group}", "--ntasks-per-node=1", '--nodelist="$group_nodes"'],
            [quote(word) for word in torchrun],
            [f"--nnodes={per_group}", f"--nproc-per-node={job.procs_per_node}", "--rdzv-backend=c10d"],
            [f'--rdzv-endpoint="$group_head:{job.port}"', '--rdzv-id="$SLURM_JOB_ID-replica$group"',
             f"--max-restarts={job.max_restarts}"],
            [quote(word) for word in job.train_args()[:4]],
            *([quote(override)] for override in job.overrides),
            list(replica_overrides('"$group"', groups))]
    return f"""# torchft's Lighthouse: where the {groups} replica groups meet for each step's quorum (its own step,
# beside group 0 on the first node).
srun --overlap --nodes=1 --ntasks=1 --nodelist="$head_node" --cpus-per-task=1 {' '.join(quote(w) for w in lighthouse)} &
lighthouse_pid=$!
export TORCHFT_LIGHTHOUSE="http://$head_node:{LIGHTHOUSE_PORT}"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
srun_pids=()
for group in $(seq 0 {groups - 1}); do
    group_list=("${{nodes[@]:$((group * {per_group})):{per_group}}}")
    group_head=${{group_list[0]}}
    group_nodes=$(IFS=,; echo "${{group_list[*]}}")
    export REPLICA_GROUP_ID=$group
    {_continued(srun, "        ")} &
    srun_pids+=($!)
done"""
