"""The hang watchdog in real processes: when one rank hangs, every rank stuck with it leaves
its stacks, even the one whose watchdog fires last."""

import subprocess
import sys

from gigatrain.rundir import RunDir
from helpers import REPO

TIMEOUT_S = 3
START = "import sys, time\nfrom pathlib import Path\nfrom gigatrain.fault.watchdog import Watchdog\n"
# A rank that makes progress once, then hangs.
HUNG = START + f"""w = Watchdog({TIMEOUT_S}, Path(sys.argv[1]), 0)
w.beat("a step")
print("beat", flush=True)
time.sleep(600)
"""
# Its peer, whose last progress came a second later, then waits on the hung rank the way a
# gloo collective does: it fails as soon as the hung rank's process is gone. Like the trainer,
# it stops its watchdog on the way out.
PEER = START + f"""w = Watchdog({TIMEOUT_S}, Path(sys.argv[1]), 1)
time.sleep(1)
w.beat("a collective")
try:
    sys.stdin.read()
finally:
    w.stop()
sys.exit(1)
"""


def test_the_last_rank_to_fire_still_writes_its_stacks(tmp_path):
    hung = subprocess.Popen([sys.executable, "-c", HUNG, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert hung.stdout.readline() == "beat\n"
        # The peer's stdin is the hung rank's stdout: it reads end-of-file when that process ends.
        peer = subprocess.run([sys.executable, "-c", PEER, str(tmp_path)], cwd=REPO, stdin=hung.stdout,
                              capture_output=True, text=True, timeout=120)
        hung.wait(timeout=120)
    finally:
        hung.kill()
    assert hung.returncode == 3
    assert peer.returncode == 3, peer.stderr  # its own watchdog fired: the hung rank had not gone yet
    assert "watchdog: rank 1 made no progress for 3 s (waiting for a collective)" in peer.stderr
    stacks = {p.name.split("-")[0]: p.read_text() for p in RunDir(tmp_path).stacks.iterdir()}
    assert set(stacks) == {"rank0", "rank1"}
    assert "in <module>" in stacks["rank0"] and "in <module>" in stacks["rank1"]
