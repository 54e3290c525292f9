"""Retired rounds' rollouts moved to <GDRIVE_PATH>/archives/<EXPERIMENT_NAME>/rollouts/ (ROLLOUT_ARCHIVE_OLD).

archives/ is in the shared folder too: a peer's link there (archives/<name>/rollouts -> a folder of this machine)
must not have the coordinator delete a folder that bears a round's name, nor move the swarm's rollouts out of the
shared folder. So the move is one rename between two folders opened one step at a time without following a link,
as every folder of an experiment is (safe_io._folder).
"""

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Iterator

from workers.shared_folder.leftovers import remove_at, remove_stale_temps_at, writer_tag
from workers.shared_folder.rejections import LinkedFolder
from workers.shared_folder.safe_io import _folder, _step_into

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _folders_below(drive: Path, parts: tuple[str, ...], create: bool = True) -> Iterator[int]:
    """A descriptor of drive/parts..., each part opened without following a link; with `create`, made if missing
    (a link planted where a folder belongs is replaced by a folder), else LinkedFolder or FileNotFoundError.
    `drive` itself is the user's (GDRIVE_PATH)."""
    fd = os.open(drive, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            parent, fd = fd, -1         # _step_into closes the parent, whatever happens
            fd = _step_into(parent, part, drive.joinpath(*parts), create=create)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


def archive_folder(source: Path, drive: Path, parts: tuple[str, ...]) -> None:
    """Move the folder `source` (in an experiment folder) to drive/parts.../<its name>; one already archived
    under that name is replaced. OSError (EXDEV: the archive is on another file system) or RejectedFile (a file
    where a folder of the archive belongs) when it cannot."""
    name = source.name
    aside = f".{name}.{writer_tag()}.{secrets.token_hex(4)}.old"      # unpredictable: no peer has it made first
    with _folder(source.parent) as source_fd, _folders_below(drive, parts) as archive_fd:
        moved_aside = False
        with contextlib.suppress(FileNotFoundError):
            os.rename(name, aside, src_dir_fd=archive_fd, dst_dir_fd=archive_fd)
            moved_aside = True
        try:
            os.rename(name, name, src_dir_fd=source_fd, dst_dir_fd=archive_fd)
        except OSError:
            if moved_aside:
                os.rename(aside, name, src_dir_fd=archive_fd, dst_dir_fd=archive_fd)
            raise
        if moved_aside:         # a kill before this leaves it to finish_killed_archiving
            remove_at(archive_fd, aside)


def finish_killed_archiving(drive: Path, parts: tuple[str, ...]) -> None:
    """What an archive_folder killed between its renames left in drive/parts...: the old round it had moved aside
    goes when the new one is in place, or comes back when not (the round is archived again later), as
    remove_stale_temps does for any folder moved aside; no link is followed on the way or below."""
    try:
        with _folders_below(drive, parts, create=False) as archive_fd:
            remove_stale_temps_at(archive_fd, drive.joinpath(*parts), depth=1)
    except (FileNotFoundError, LinkedFolder):      # nothing archived yet, or a peer's link: the next move replaces it
        return
    except OSError as exc:     # a Drive hiccup: the next start looks again
        log.warning("%s: what a killed archiving left aside is not cleared (%s); the next start tries again",
                    drive.joinpath(*parts), exc.strerror or exc)
