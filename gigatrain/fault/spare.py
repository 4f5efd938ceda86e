"""Warm spares: a restarted torchrun worker that starts training in a fraction of a second.

A restart under torchrun (`--max-restarts`) starts every worker as a new Python process, which
spends seconds importing Python, torch and gigatrain before it can rendezvous: on a 2-core
machine that was most of a restart (docs/fault-tolerance.md, "Where restart time goes").
So the first worker of each local rank, once it has imported all of that (and before any
thread of its own, process group or CUDA context exists), forks a *spare*: a process that
keeps those imports, leaves the worker's session (torchrun stops a worker by signalling its
whole process group) and waits on a Unix socket named after the job (torchrun's run id, its
agent's pid, the local rank), in a folder only this user may enter.

A restarted worker, before importing anything heavy (`hand_over`, first thing in `gigatrain`'s
`main`), finds that socket and hands over its command line, environment, working directory and
stdin/stdout/stderr. The spare forks a fresh copy of itself that becomes the trainer; the worker
stays as its stand-in for torchrun: it forwards torchrun's signals to the trainer, and exits
with the trainer's exit status (or dies of the same signal), while the trainer kills itself if
the stand-in dies (torchrun's SIGKILL, a fault drill's kill). The spare serves every restart of
the job and exits when torchrun's agent does. Without a spare (the first start, a spare that
has died, `fault.warm_spare=false`) a worker starts as before, cold.

Only stdlib at module level: `hand_over` runs before torch is imported.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

# Set in a trainer forked by a spare: it neither looks for a spare nor forks another.
CHILD_ENV = "GIGATRAIN_FROM_SPARE"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
REQUEST_TIMEOUT_S = 10.0
POLL_S = 0.2  # how often the spare reaps its trainers and looks for its agent
WARM_UP_MODULES = ("torch._dynamo", "torch.distributed.checkpoint")


def socket_path() -> Path | None:
    """This worker's spare, if torchrun may restart it: its run id, its agent (our parent) and
    local rank name it. None outside torchrun or when torchrun will not restart."""
    env = os.environ
    run_id, local_rank = env.get("TORCHELASTIC_RUN_ID"), env.get("LOCAL_RANK")
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        restarts = 0
    if run_id is None or local_rank is None or restarts < 1:
        return None
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    # Hashed: a run id is the user's text, and a socket's path is limited to ~100 bytes.
    key = hashlib.sha256(f"{run_id}/{os.getppid()}/{local_rank}".encode()).hexdigest()[:24]
    return base / f"gigatrain-spares-{os.getuid()}" / f"{key}.sock"


def _private_folder(path: Path) -> bool:
    """Whether the socket's folder is ours alone: a spare in another user's folder is not trusted."""
    try:
        info = path.parent.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and info.st_mode & 0o077 == 0


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    payload = json.dumps(message).encode()
    data = struct.pack("!I", len(payload)) + payload
    if fds:
        socket.send_fds(conn, [data], fds)
    else:
        conn.sendall(data)


def _receive(conn: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (and up to max_fds file descriptors sent with it); None at end of stream."""
    fds: list[int] = []
    head = b""
    while len(head) < 4:
        if max_fds and not fds:
            chunk, got, _, _ = socket.recv_fds(conn, 4 - len(head), max_fds)
            fds.extend(got)
        else:
            chunk = conn.recv(4 - len(head))
        if not chunk:
            return None, fds
        head += chunk
    size = struct.unpack("!I", head)[0]
    body = b""
    while len(body) < size:
        chunk = conn.recv(min(size - len(body), 1 << 16))
        if not chunk:
            return None, fds
        body += chunk
    return json.loads(body), fds


# -- the restarted worker: hand over to the spare, then stand in for the trainer ---------------
def hand_over(argv: list[str]) -> int | None:
    """Run `gigatrain train` in this job's spare if there is one: returns the trainer's exit
    code (or dies of the signal that killed it); None when there is no spare to take it."""
    if not argv or argv[0] != "train" or os.environ.get(CHILD_ENV):
        return None
    path = socket_path()
    if path is None or not path.exists() or not _private_folder(path):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(REQUEST_TIMEOUT_S)  # a spare that does not answer is passed over
    try:
        conn.connect(str(path))
        _send(conn, {"argv": ["gigatrain", *argv], "env": dict(os.environ), "cwd": os.getcwd()}, [0, 1, 2])
        accepted, _ = _receive(conn)
    except OSError:
        accepted = None
    if accepted is None or "pid" not in accepted:
        conn.close()  # (a trainer the spare forks after all sees this end closed, and ends at once)
        return None  # a spare that is gone (its socket left behind) or stuck: start cold
    conn.settimeout(None)

    def forward(number: int, _frame) -> None:
        try:
            conn.sendall(struct.pack("!I", number))
        except OSError:
            pass  # the trainer is gone; its status (or the spare's end) comes next

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    try:
        ended, _ = _receive(conn)
    except OSError:
        ended = None
    if ended is None:
        print("gigatrain: error: the warm spare ended without reporting the trainer's exit status", file=sys.stderr)
        return 1
    status = ended["status"]
    if os.WIFSIGNALED(status):
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))  # die as the trainer did, for torchrun's summary
    return os.waitstatus_to_exitcode(status)


# -- the first worker: fork the spare ----------------------------------------------------------
def start_spare(run: Callable[[list[str]], int]) -> bool:
    """Fork this job's spare for this worker's local rank, if torchrun may restart it and none
    serves it yet; its trainers call `run` (the command line's, gigatrain.cli.run) with the
    restarted worker's arguments. Called once the trainer's modules are imported, before any
    process group, CUDA context or thread of ours exists. Returns whether a spare was started."""
    path = socket_path()
    if path is None or os.environ.get(CHILD_ENV):
        return False
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        return False  # a forked CUDA context is unusable
    path.parent.mkdir(mode=0o700, exist_ok=True)
    if not _private_folder(path):
        return False
    path.unlink(missing_ok=True)  # a spare that died left it (one that lives would have served us)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))  # before the fork: a worker killed at once still finds its spare
    listener.listen(8)
    agent = os.getppid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()  # out of the worker's process group, which torchrun kills
            if os.fork() == 0:
                _serve(listener, path, agent, run)
        finally:
            os._exit(0)
    listener.close()
    os.waitpid(pid, 0)
    return True


# -- the spare ------------------------------------------------------------------------------------
def _serve(listener: socket.socket, path: Path, agent: int, run: Callable[[list[str]], int]) -> None:
    """The spare's loop: a trainer forked for each restarted worker, until the agent is gone."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)  # never hold torchrun's (or a test's) pipes open
    os.close(devnull)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _warm_up()
    try:
        agent_gone = os.pidfd_open(agent)
    except (OSError, AttributeError):
        agent_gone = None
    trainers: dict[int, socket.socket] = {}
    try:
        while agent_gone is not None or _alive(agent):
            _reap(trainers)
            ready, _, _ = select.select([listener] + ([agent_gone] if agent_gone is not None else []), [], [], POLL_S)
            if agent_gone in ready:
                break
            if listener in ready:
                _accept(listener, trainers, run)
    finally:
        path.unlink(missing_ok=True)
        os._exit(0)


def _warm_up() -> None:
    """Import now what the trainer would import lazily at its start (the optimizer pulls in
    torch._dynamo, seconds of it): the spare has the time, a restart has not."""
    for module in WARM_UP_MODULES:
        try:
            importlib.import_module(module)
        except Exception:  # a warm-up only: the trainer imports what it needs anyway
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _reap(trainers: dict[int, socket.socket]) -> None:
    """Tell each ended trainer's stand-in how it ended."""
    while trainers:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn = trainers.pop(pid, None)
        if conn is not None:
            try:
                _send(conn, {"status": status})
            except OSError:
                pass  # the stand-in is gone
            conn.close()


def _accept(listener: socket.socket, trainers: dict[int, socket.socket], run: Callable[[list[str]], int]) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            raise OSError("another user")
        conn.settimeout(REQUEST_TIMEOUT_S)
        request, fds = _receive(conn, max_fds=3)
        conn.settimeout(None)
        if request is None or len(fds) != 3:
            raise OSError("incomplete request")
        pid = os.fork()
    except (OSError, ValueError):
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    if pid == 0:
        listener.close()
        for other in trainers.values():
            other.close()
        _become_trainer(conn, request, fds, run)
    for fd in fds:
        os.close(fd)
    trainers[pid] = conn
    try:
        _send(conn, {"pid": pid})
    except OSError:
        pass  # the stand-in died already: the trainer sees its end of the socket close


def _become_trainer(conn: socket.socket, request: dict, fds: list[int], run: Callable[[list[str]], int]) -> None:
    """In the forked trainer: take the restarted worker's place, run `gigatrain train`, exit."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[CHILD_ENV] = "1"
        sys.argv = request["argv"]
        threading.Thread(target=_obey_stand_in, args=(conn,), daemon=True, name="spare-stand-in").start()
        code = run(request["argv"][1:])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _obey_stand_in(conn: socket.socket) -> None:
    """The signals torchrun sends the stand-in reach the trainer; its death is the trainer's."""
    while True:
        try:
            data = conn.recv(4, socket.MSG_WAITALL)
        except OSError:
            data = b""
        if len(data) < 4:
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), struct.unpack("!I", data)[0])
