"""Surviving failures: fault injection, the hang watchdog, numerical guards (goodput, the
measure of how well a run survived, is gigatrain.metrics.goodput).

Exit codes the launch scripts rely on (docs/fault-tolerance.md):
"""

EXIT_OK = 0
EXIT_USAGE = 2  # bad input: fix it, do not restart
EXIT_HANG = 3  # the watchdog saw no progress: restart (torchrun --max-restarts does)
EXIT_DIVERGED = 4  # numerical faults persisted through rollbacks: do not restart as is
EXIT_CHECKPOINT_WRITE = 5  # the last checkpoint could not be written (e.g. disk full); the previous one stands
EXIT_REQUEUE = 75  # BSD EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; run again to resume
EXIT_SIGINT = 130  # interrupted by the user (a checkpoint was saved)
