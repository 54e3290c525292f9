"""Big files (checkpoints, best models) written in synced steps, so that the swarm's small writes beside them keep
their pace.

A checkpoint of GPT-2 124M is ~1 GB a worker, and every worker writes one in the same round. Written whole and
synced at the end, the page cache holds gigabytes of dirty data, and on ext4 every other fsync on the disk (a
peer's rollouts, the coordinator's round state, each written atomically) waits behind its writeback: on an H200
the rounds right after a checkpoint took 0.7-1.0 s instead of 0.13, nearly all of it in the exchange
(bench/NOTES.md). Synced every SYNC_EVERY bytes, no writeback is ever large: a 2 GB write held a small fsync beside
it for at most 15-34 ms instead of 131-451 ms on this project's CPU machine (bench/fsync_probe.py).
"""

import json
import os
import struct
from pathlib import Path
from types import TracebackType

import torch

SYNC_EVERY = 32 * 1024 * 1024

# safetensors' names of the dtypes a checkpoint holds
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class PacedFile:
    """A new binary file (never an existing one, never through a link) whose data is synced to the disk every
    SYNC_EVERY bytes and once more at close: torch.save writes into it as into any file."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        self._file = os.fdopen(fd, "wb")
        self._unsynced = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), SYNC_EVERY):
            piece = view[start:start + SYNC_EVERY]
            self._file.write(piece)
            self._unsynced += len(piece)
            if self._unsynced >= SYNC_EVERY:
                self._sync()
        return len(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._sync()
            finally:
                self._file.close()

    def _sync(self) -> None:
        self._file.flush()
        os.fdatasync(self._file.fileno())
        self._unsynced = 0

    def __enter__(self) -> "PacedFile":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`tensors` (on the host, none sharing memory) as a safetensors file (safetensors' loaders read it), written
    through a PacedFile straight from the tensors' memory: no copy of the whole file is made first."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset, ordered = 0, []
    for name, tensor in sorted(tensors.items()):
        if tensor.dtype not in _DTYPES or tensor.device.type != "cpu":
            raise ValueError(f"save_safetensors: {name} is {tensor.dtype} on {tensor.device}; expected a host "
                             f"tensor of {', '.join(sorted(_DTYPES.values()))}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        ordered.append(tensor)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)           # the data starts 8-byte aligned, as safetensors writes it
    with PacedFile(path) as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for tensor in ordered:
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
