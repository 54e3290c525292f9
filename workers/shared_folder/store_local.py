"""storage.Store over a local (or mounted Drive) folder: safe_io's helpers as they always worked, plus a
create-only write (a hard link, which POSIX refuses where a name already is)."""

from __future__ import annotations   # a store's `list` method would shadow list[...] in its annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from workers.shared_folder import appends, safe_io
from workers.shared_folder.leftovers import temp_prefix
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.storage import MAX_LISTED, Entry, Version


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str, limit: int) -> bytes:
        try:
            return safe_io.read_whole(self._path(key), limit)
        except RejectedFile as error:
            raise ValueError(str(error)) from error

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return safe_io.read_from(self._path(key), start, length)

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._sealed_temp(path, data), path)     # replaces a planted link itself, never through it

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._sealed_temp(path, data)
        try:
            os.link(tmp, path)             # whole content or nothing, and never over an existing name
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def _sealed_temp(self, path: Path, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
        try:
            safe_io.write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def append(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        appends.append_durably(path, data)

    def read_log(self, key: str, start: int, limit: int) -> bytes:
        try:
            return safe_io.read_from(self._path(key), start, limit)
        except FileNotFoundError:
            return b""

    def list(self, key: str, limit: int = MAX_LISTED) -> list[Entry]:
        entries = []
        for path in safe_io.list_folder(self._path(key), limit=limit):
            info = path.lstat()
            folder = path.is_dir() and not path.is_symlink()
            entries.append(Entry(name=path.name, size=0 if folder else info.st_size, folder=folder))
        return entries

    def version(self, key: str) -> Version:
        info = self._path(key).lstat()
        return info.st_mtime_ns, info.st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
