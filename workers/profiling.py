"""PROFILE_ROUND: one round of a worker under torch.profiler, its time per operator written beside the worker's log.

The question it answers is where a round's time goes (generation's launches, the update's kernels, CPU-side
work), on the machine that runs the swarm, without a second tool."""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from workers.shared_folder.safe_io import write_atomic

log = logging.getLogger(__name__)
ROWS = 30           # operators in the table, the most expensive first


@contextmanager
def profiled(wanted: bool, out: Path, device: torch.device, title: str) -> Iterator[None]:
    """Run the block under the profiler when `wanted`, then write its table to `out` (atomically). A table that
    cannot be written is a warning: the round it measured is kept."""
    if not wanted:
        yield
        return
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    started = time.monotonic()
    with profile(activities=activities) as prof:
        yield
        if on_cuda:
            torch.cuda.synchronize(device)
    wall = time.monotonic() - started
    events = prof.key_averages()
    sort = "cuda_time_total" if on_cuda else "cpu_time_total"
    header = (f"{title}: {wall:.3f} s of wall time under the profiler on {device} (torch {torch.__version__}); "
              f"the {ROWS} most expensive operators by {sort}\n")
    table = events.table(sort_by=sort, row_limit=ROWS, max_name_column_width=60)
    try:
        write_atomic(out, (header + table + "\n").encode())
    except OSError as exc:
        log.warning("%s: profile not written to %s: %s", title, out, exc)
        return
    log.info("%s profiled (%.2fs): %s", title, wall, out)
