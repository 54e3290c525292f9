"""A dropped Drive mount must not become a local folder.

When Colab's Drive mount drops ("Transport endpoint is not connected", or the folder simply gone for a
minute), a write that made its missing parents would build the experiment's path again on the local disk:
records would land there, unseen by any peer, and vanish under the mount when it comes back. So a process
names the experiment folders it writes under, and below them parents are made only while the folder itself
is there; otherwise the write fails like any Drive failure (the worker's outbox keeps it and tries again).
"""

import errno
import os
import threading
from pathlib import Path

from workers.shared_folder import drive_sim

_roots: set[str] = set()
_lock = threading.RLock()     # re-entrant: a signal handler's event can write while this thread holds it


def claim(root: Path) -> None:
    """Writes below `root` never create `root` itself again (it was made, once, at the swarm's start)."""
    with _lock:
        _roots.add(os.path.abspath(root))


def make_dirs(directory: Path) -> None:
    """mkdir -p, refusing when the claimed experiment folder above `directory` is not there."""
    if directory.is_dir():
        return
    target = os.path.abspath(directory)
    with _lock:
        roots = [root for root in _roots if target == root or target.startswith(root + os.sep)]
    for root in roots:
        if not os.path.isdir(root):
            raise OSError(errno.ENOTCONN, f"the shared folder {root} is not there (a dropped Drive mount?); "
                                          "the write waits until it is back")
    directory.mkdir(parents=True, exist_ok=True)


def folder_present(root: Path) -> bool:
    """Whether the experiment folder is there: False while a Drive mount is dropped."""
    if drive_sim.hung_up():
        return False
    try:
        return os.path.isdir(root)
    except OSError:         # ENOTCONN from stat itself, on a mount that hangs up rather than vanishes
        return False
