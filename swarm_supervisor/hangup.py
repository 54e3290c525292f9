"""A terminal that hangs up (an SSH session that drops, a window closed) stops a long command as Ctrl-C does,
unless nohup made it ignore the hang-up.

A shell passes the hang-up on to its jobs and the kernel sends it again as the shell exits: a handler runs
twice within milliseconds, and must treat the second as the first, not as a second Ctrl-C (which kills).
"""

import functools
import os
import signal
import subprocess
from typing import Any, Callable

from workers.processes import stop_with_parent

Handler = Callable[[int, Any], None]


def on_hangup(handler: Handler) -> Any:
    """Install `handler` for SIGHUP; what was there before (to put back), or None under nohup (left ignored)."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return None
    return signal.signal(signal.SIGHUP, handler)


def terminal_outputs() -> tuple[int, ...]:
    """Which of stdout and stderr are a terminal, asked while it is there (a hung-up one cannot be asked)."""
    return tuple(fd for fd in (1, 2) if os.isatty(fd))


def print_nowhere(fds: tuple[int, ...]) -> None:
    """Those descriptors to /dev/null from now on: a write to a hung-up terminal fails (EIO). A file or pipe
    the output was sent to keeps it."""
    if not fds:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def session_of_its_own() -> dict[str, Any]:
    """Popen options for a swarm this process starts and stops (a table's arm, a notebook cell's `up`). A session
    of its own: a Ctrl-C in the terminal reaches this process alone, which passes exactly one SIGINT on (a second
    one would kill the swarm before its checkpoints). And a SIGINT when this process dies, even by kill -9 or a
    notebook kernel's restart: no swarm runs on with nobody left to stop it."""
    return {"stdin": subprocess.DEVNULL, "start_new_session": True,
            "preexec_fn": functools.partial(stop_with_parent, os.getpid(), signal.SIGINT)}
