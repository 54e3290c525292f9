"""Host memory that a worker copies its checkpoints into, reused once their writes have ended.

A fresh host copy of GPT-2 124M's weights and AdamW moments (~0.95 GB) touches every page of new memory: the
kernel maps and zeroes each one, inside the round (0.41-0.90 s from an H200, 0.65-0.82 s on a 2-core CPU), where a
copy into memory that held the previous snapshot is a memcpy (0.12 s on that CPU; bench/NOTES.md).

A copy is handed back only once the write that read it has ended: by the writer thread after its last try, or by
the worker when the write was never queued. So a snapshot is never overwritten while its write still reads it: a
checkpoint whose SHA-256 matches mixed contents would resume as a model no round ever had.
"""

import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch

# free copies kept between writes: a checkpoint's (weights and moments, ~0.95 GB of RAM for GPT-2 124M). A best
# model's copy is made fresh: a third of the size, and only at an evaluation that beats the others
KEEP = 1
# a free copy is let go instead when the host would keep less than this share of its RAM available: the 32 workers
# of a SAPO table keep ~30 GB between checkpoints, more than a small host can spare to save ~0.5 s a checkpoint
MIN_AVAILABLE = 0.2

Layout = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in `value` (tensors in dicts, lists and tuples), in the order _rebuild puts them back."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _rebuild(value: Any, copies: Iterator[torch.Tensor]) -> Any:
    """`value` with its tensors replaced, in _tensors' order, by the next of `copies`; the rest kept."""
    if isinstance(value, torch.Tensor):
        return next(copies)
    if isinstance(value, dict):
        return {key: _rebuild(item, copies) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(item, copies) for item in value)
    return value


class HostCopies:
    """A worker's host copies: `copy` fills a free one of the same layout (or new memory), and the release it
    returns makes it free again. At most KEEP free copies are kept; the others are let go."""

    def __init__(self, keep: int = KEEP):
        self._keep = keep
        self._free: list[tuple[Layout, list[torch.Tensor]]] = []
        self._lock = threading.Lock()       # copies are taken in the worker's thread, released in the writer's

    def copy(self, value: Any) -> tuple[Any, Callable[[], None]]:
        """`value` with every tensor copied to host memory, and the call that hands that memory back: made
        once nothing reads the copy any more (a second call does nothing)."""
        sources = [tensor.detach() for tensor in _tensors(value)]
        layout = tuple((tuple(tensor.shape), tensor.dtype) for tensor in sources)
        buffers = self._take(layout) or [torch.empty(shape, dtype=dtype) for shape, dtype in layout]
        for buffer, source in zip(buffers, sources):
            buffer.copy_(source)
        held = [buffers]

        def release() -> None:
            with self._lock:
                if held and _room_to_keep():
                    self._free.append((layout, held[0]))
                    del self._free[:max(0, len(self._free) - self._keep)]       # the oldest go
                held.clear()

        return _rebuild(value, iter(buffers)), release

    def _take(self, layout: Layout) -> list[torch.Tensor] | None:
        with self._lock:
            for index, (free_layout, buffers) in enumerate(self._free):
                if free_layout == layout:
                    del self._free[index]
                    return buffers
        return None


def _room_to_keep() -> bool:
    """Whether the host has MIN_AVAILABLE of its RAM available with the copy kept (its pages already count)."""
    memory = psutil.virtual_memory()
    return memory.available >= MIN_AVAILABLE * memory.total


def fresh_copy(value: Any) -> Any:
    """`value` with every tensor copied to new host memory, never reused."""
    return HostCopies(keep=0).copy(value)[0]
