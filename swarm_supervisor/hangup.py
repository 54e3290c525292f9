"""A terminal that hangs up (an SSH session that drops, a window closed) stops a long command as Ctrl-C does,
unless nohup made it ignore the hang-up."""

import os
import signal
from typing import Any, Callable

Handler = Callable[[int, Any], None]


def on_hangup(handler: Handler) -> Any:
    """Install `handler` for SIGHUP; what was there before (to put back), or None under nohup (left ignored)."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return None
    return signal.signal(signal.SIGHUP, handler)


def print_nowhere() -> None:
    """stdout and stderr to /dev/null from now on: a write to a hung-up terminal fails (EIO)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
