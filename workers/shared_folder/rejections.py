"""What the shared-folder transport refuses, and how it says so: the errors a caller catches (FolderError for a
folder that cannot be used, RejectedFile and its kinds for a file that is skipped, never trusted), the one warning
per process of each skipped file, and the check that makes a node id safe to become a file name.
"""

import logging
import re
import threading
from pathlib import Path

from configs_env import SwarmError

log = logging.getLogger(__name__)

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")     # matched whole: fullmatch, never a `$` anchor


class FolderError(SwarmError):
    """The shared folder cannot be used (missing, not writable, or claimed by someone else)."""


class RejectedFile(SwarmError):
    """A file in the shared folder failed validation; it is skipped and counted, never trusted."""


_warned: dict[str, None] = {}      # insertion-ordered: past WARNED_KEEP the oldest is forgotten first
_warned_lock = threading.Lock()
WARNED_KEEP = 4096


def naming(path: Path, error: RejectedFile) -> str:
    """The refusal as one message that starts with the file, also for checks (a node id, say) that do not
    know which file they run on."""
    text = str(error)
    return text if text.startswith(str(path)) else f"{path}: {text}; skipped"


def warn_skipped(path: Path, error: RejectedFile) -> None:
    """Log a skipped file once per process: a reader that polls (the dashboard, several times a second) meets
    the same bad file again and again."""
    warn_once(naming(path, error))


def warn_once(text: str) -> None:
    with _warned_lock:
        if text in _warned:
            return
        if len(_warned) >= WARNED_KEEP:
            del _warned[next(iter(_warned))]
        _warned[text] = None
    log.warning("%s", text)


def check_node_name(name: str) -> str:
    """Node ids become file names: letters, digits, '.', '_', '-' only, so `../../etc` never becomes a path."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name) or name in (".", ".."):
        raise RejectedFile(f"node id {name!r} is not a safe name (letters, digits, '.', '_', '-', at most 64)")
    return name


class NotRegularFile(RejectedFile):
    """Something other than a regular file where the swarm expects one: a link, FIFO, socket, folder, device."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}, not a regular file; skipped")
        self.what = what


class LinkedFolder(RejectedFile):
    """A folder inside the experiment folder that is a symbolic link (or no folder at all): never followed."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what} where a folder of the experiment belongs; not followed, skipped")
