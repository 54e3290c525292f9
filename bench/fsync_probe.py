"""How long the swarm's small atomic writes (temp file, fsync, rename: a rollout, a round state) wait while a big
file is written beside them, written whole and synced at the end (as checkpoints were) or through
workers.paced_files.PacedFile (synced every SYNC_EVERY bytes).

    python -m bench.fsync_probe [MIB] [FOLDER]      (default 2048 MiB in /tmp; run it on the disk in question)
"""

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from workers.paced_files import SYNC_EVERY, PacedFile


def small_writes(folder: Path, stop: threading.Event, waits: list[float]) -> None:
    """A 4 kB atomic write every 20 ms, each one's seconds into `waits`."""
    count = 0
    while not stop.is_set():
        path = folder / f"small_{count % 4}.json"
        began = time.perf_counter()
        fd = os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, b"x" * 4000)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(f"{path}.tmp", path)
        waits.append(time.perf_counter() - began)
        count += 1
        time.sleep(0.02)


def big_write(path: Path, size: int, paced: bool) -> None:
    piece = os.urandom(SYNC_EVERY)
    if paced:
        with PacedFile(path) as f:
            for _ in range(size // len(piece)):
                f.write(piece)
        return
    with open(path, "wb") as f:
        for _ in range(size // len(piece)):
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())


def measure(folder: Path, size: int, paced: bool) -> str:
    waits: list[float] = []
    stop = threading.Event()
    writer = threading.Thread(target=small_writes, args=(folder, stop, waits))
    writer.start()
    time.sleep(0.3)
    began = time.perf_counter()
    big_write(folder / f"big_{paced}", size, paced)
    seconds = time.perf_counter() - began
    time.sleep(0.3)
    stop.set()
    writer.join(timeout=10)
    (folder / f"big_{paced}").unlink()
    waits.sort()
    return (f"{'paced' if paced else 'whole'}: {size >> 20} MiB in {seconds:.2f} s; {len(waits)} small writes beside "
            f"it: median {1e3 * waits[len(waits) // 2]:.1f} ms, p90 {1e3 * waits[int(0.9 * len(waits))]:.1f} ms, "
            f"most {1e3 * waits[-1]:.0f} ms")


def main() -> None:
    size = (int(sys.argv[1]) if len(sys.argv) > 1 else 2048) << 20
    with tempfile.TemporaryDirectory(dir=sys.argv[2] if len(sys.argv) > 2 else None) as folder:
        for paced in (False, True, False, True):
            print(measure(Path(folder), size, paced), flush=True)


if __name__ == "__main__":
    main()
