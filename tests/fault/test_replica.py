"""fault.recovery=replica: replica groups on torchft (a real Lighthouse, Managers and gloo).

One end-to-end run: a Lighthouse (`gigatrain lighthouse`) and two replica groups, each its own
torchrun job of one process; group 1 is killed mid-run. Group 0 must never stop (no restart,
every step trained, the outage's steps recorded with replicas=1), group 1 must rejoin with
group 0's live state within a bounded number of steps, and both must end with bit-identical
weights. And, in one process, two replica groups' averaged gradients must equal one model's
on the combined batch."""

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from gigatrain.cli import run as cli_run
from gigatrain.config import Config, ConfigError, load_config, resolve_model_args
from gigatrain.fault.guard import NumericalGuard
from gigatrain.models.loss import loss_fn
from gigatrain.models.transformer import Transformer
from gigatrain.rundir import RunDir
from gigatrain.train.checkpointing import TrainState
from helpers import REPO, TINY, final_weights, kill_tree, run_group, torchrun

pytest.importorskip("torchft")  # the `test` extra installs it

STEPS, KILL_AT, SLOW_S = 30, 3, 0.4
# A rejoin costs group 1 a process start, imports, the model build and the transfer: 5 s on
# two idle cores (11 of group 0's 0.45 s steps), 13 s on busy ones, where the steps slow down too
# (8 steps of 1.5 s). The bound leaves room for a slower machine.
REJOIN_WITHIN = 24


def start_lighthouse(*options: str) -> tuple[subprocess.Popen, str]:
    """`gigatrain lighthouse` on a free port; returns the process and its address."""
    process = subprocess.Popen([sys.executable, "-m", "gigatrain", "lighthouse", "--bind=[::]:0", *options],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    line = process.stdout.readline()
    assert line.startswith("torchft Lighthouse at http://"), line
    return process, line.split()[3]


def test_a_killed_replica_group_rejoins_while_the_other_trains_on(tmp_path, byte_data):
    lighthouse, address = start_lighthouse("--heartbeat-timeout-ms=1000", "--join-timeout-ms=2000")
    run_dir = tmp_path / "run"
    base = [*TINY, "--train.device=cpu", "--train.eval_every=1000", f"--train.max_steps={STEPS}",
            "--train.checkpoint_every=10", f"--data.path={byte_data}", f"--run.dir={run_dir}",
            "--fault.recovery=replica", "--fault.replica_groups=2"]
    faults = {0: f"slow:seconds={SLOW_S}", 1: f"kill:step={KILL_AT}"}
    results = {}

    def group(i: int) -> None:
        # Group 1 restarts cold (no warm spare): from a spare it rejoined 1.5 s after the kill,
        # while group 0's next quorum still waited for it (--join-timeout-ms=2000), so group 0
        # never trained alone, and this test is of the outage. (Spares with replica groups run
        # in the replica soak, bench/soak.py: 10 kills, all replicas identical.)
        cold = ["--fault.warm_spare=false"] if i == 1 else []
        command = torchrun("--standalone", "--nproc-per-node=1", "--max-restarts=1", "-m", "gigatrain", "train", *base,
                           *cold)
        results[i] = run_group(command, timeout=150, env={"GIGATRAIN_FAULT": faults[i], "REPLICA_GROUP_ID": str(i),
                                                         "TORCHFT_LIGHTHOUSE": address, "RUST_LOG": "warn"})
    try:
        threads = [threading.Thread(target=group, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        kill_tree(lighthouse.pid)
    for i in (0, 1):
        assert results[i].returncode == 0, results[i].stderr[-3000:]
    survivor, killed = RunDir(run_dir / "replica0"), RunDir(run_dir / "replica1")

    # Group 0 never stopped: one start, no restart, every step trained once, in order (the
    # groups of a new run wait for each other before step 1, so neither heals from the other).
    events0 = survivor.event_records()
    assert [e["event"] for e in events0 if e["event"] in ("start", "restart", "rejoin")] == ["start"]
    steps0 = [r for r in survivor.metrics_records() if "loss" in r]
    assert [r["step"] for r in steps0] == list(range(1, STEPS + 1))
    replicas = {r["step"]: r["replicas"] for r in steps0}
    # The outage: from the kill until the rejoin group 0 trained alone, and recorded it.
    alone = [step for step, n in replicas.items() if n == 1 and step >= KILL_AT]
    assert alone and alone == list(range(alone[0], alone[-1] + 1))
    assert replicas[1] == replicas[STEPS] == 2 and set(replicas.values()) <= {1, 2}
    assert [e["step"] for e in events0 if e["event"] == "uncommitted"][:1] == [KILL_AT]  # the step the kill cut short

    # Group 1 was killed once, restarted, and rejoined with group 0's live state.
    assert results[1].stdout.count(f"injecting fault kill:step={KILL_AT}") == 1
    events1 = killed.event_records()
    restart, = [e for e in events1 if e["event"] == "restart"]
    assert restart["loaded_from"] == "replica" and restart["after"] == "failure" and not restart["warm_spare"]
    rejoin, = [e for e in events1 if e["event"] == "rejoin"]
    assert rejoin["source_replica"] == 0 and rejoin["replicas"] == 2
    assert KILL_AT <= rejoin["step"] <= KILL_AT + REJOIN_WITHIN
    assert rejoin["step"] == alone[-1]  # it took part in the first step after the outage
    steps1 = {r["step"]: r for r in killed.metrics_records() if "loss" in r}
    # From the rejoin on, both groups logged the same averaged loss at every step.
    for step in range(rejoin["step"] + 1, STEPS + 1):
        assert steps1[step]["loss"] == steps0[step - 1]["loss"], step

    # Both groups hold bit-identical weights at the end (each wrote its own checkpoints).
    got, want = final_weights(killed.path), final_weights(survivor.path)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_averaged_gradients_equal_one_model_on_the_combined_batch(monkeypatch):
    """Two replica groups (threads with their own Manager and store) each take half of a batch;
    after two SGD steps their weights equal one model's trained on the whole batch, to float32
    rounding (rtol 1e-5, atol 1e-7: the sum runs in another order)."""
    from torchft._torchft import LighthouseServer

    from gigatrain.train.replica import ReplicaGroup

    monkeypatch.delenv("MASTER_ADDR", raising=False)  # each group hosts its own store
    monkeypatch.setenv("RUST_LOG", "warn")
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2)
    address = lighthouse.address()
    cfg = load_config(None, [*TINY, "--fault.recovery=replica", "--fault.replica_id=0"])
    args = resolve_model_args(cfg, vocab_size=256)
    torch.manual_seed(0)
    batches = [torch.randint(0, 256, (8, 33)) for _ in range(2)]
    lr = 0.5

    def train(model, rows, group=None):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        losses = []
        for batch in batches:
            tokens = batch[rows]
            loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
            loss.backward()
            if group is not None:
                assert group.start_step() == 2
                loss = group.average(loss.detach())
                assert group.should_commit()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    results = {}

    def replica(i: int) -> None:
        model = Transformer(args, seed=0)
        state, fault = TrainState(), cfg.fault
        group = ReplicaGroup(cfg, address, group_rank=0, group_size=1,
                             parallel=SimpleNamespace(parts=[model], parameters=lambda: list(model.parameters())),
                             optimizers=[], loader=None, state=state, guard=NumericalGuard(fault),
                             checkpoints=SimpleNamespace(loaded_from=None), metrics=None, started_at=time.time())
        group.replica_id = i
        group.start()
        try:
            results[i] = (train(model, slice(4 * i, 4 * i + 4), group), model.state_dict())
        finally:
            group.close()
    try:
        threads = [threading.Thread(target=replica, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        lighthouse.shutdown()
    assert set(results) == {0, 1}
    whole = Transformer(args, seed=0)
    losses = train(whole, slice(0, 8))
    for i in (0, 1):
        assert results[i][0] == pytest.approx(losses, rel=1e-6)
        for name, want in whole.state_dict().items():
            torch.testing.assert_close(results[i][1][name], want, rtol=1e-5, atol=1e-7, msg=name)
    for name, tensor in results[0][1].items():  # and the two groups agree bit for bit
        assert torch.equal(tensor, results[1][1][name]), name


@pytest.mark.parametrize("overrides, env, message", [
    (["--fault.replica_groups=1", "--fault.replica_id=0"], {}, "fault.replica_groups=1 is not valid"),
    (["--fault.replica_id=2"], {}, "fault.replica_id=2 is not valid; with fault.replica_groups=2 it must be 0 to 1"),
    ([], {}, "needs this replica group's number"),
    ([], {"REPLICA_GROUP_ID": "x"}, "REPLICA_GROUP_ID='x' is not valid"),
    (["--fault.replica_id=1"], {"TORCHFT_LIGHTHOUSE": ""}, "needs the torchft Lighthouse's address"),
    (["--fault.replica_id=1", "--fault.lighthouse=http://localhost:1", "--fault.startup_timeout_s=1"], {}, "cannot reach the torchft Lighthouse at http://localhost:1"),
])
def test_replica_mode_config_errors_are_one_line(tmp_path, byte_data, monkeypatch, capsys, overrides, env, message):
    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = cli_run(["train", *TINY, f"--data.path={byte_data}", f"--run.dir={tmp_path / 'run'}",
                    "--fault.recovery=replica", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_replica_groups_record_in_their_own_folders():
    cfg = load_config(None, ["--run.dir=/r", "--fault.recovery=replica", "--fault.replica_id=1"])
    assert str(cfg.run_dir) == "/r/replica1"
    with pytest.raises(ConfigError):
        load_config(None, ["--fault.recovery=replica", "--fault.replica_id=1", "--fault.min_replicas=3"])
    assert Config().run_dir.name != "replica0"
