"""How many checkpoints a worker keeps, and how much disk they take, from the model's config alone, before any
worker starts. Torch-free, as workers.learning.memory: the CLI imports it whatever the command (its disk check)."""

import os
from pathlib import Path

from workers.learning.memory import parameter_count

KEEP_LAST = 2                           # a worker's newest checkpoints kept; workers.checkpoint prunes the older
WEIGHT_BYTES = 4                        # model.safetensors holds fp32 weights
# state.pt holds AdamW's two moments: bf16 on CUDA (workers.learning.optim), fp32 with torch's AdamW on the CPU
MOMENT_BYTES = {True: 2 * 2, False: 2 * 4}
MAX_FILES_COUNTED = 10_000              # a folder holding more is counted this far (its size is then a floor)


def worker_checkpoint_bytes(config, on_cuda: bool) -> int:
    """The most one worker's checkpoints take at once: KEEP_LAST kept, one more being written before the oldest
    goes, and the weights of its best held-out model (checkpoints/<node>/best)."""
    params = parameter_count(config)
    one = params * (WEIGHT_BYTES + MOMENT_BYTES[on_cuda])
    return (KEEP_LAST + 1) * one + params * WEIGHT_BYTES


def bytes_under(folder: Path) -> int:
    """The regular files' bytes under `folder` (links not followed), 0 when it does not exist."""
    total, seen, pending = 0, 0, [folder]
    while pending and seen < MAX_FILES_COUNTED:
        try:
            with os.scandir(pending.pop()) as listing:
                entries = list(listing)
        except OSError:         # gone or unreadable: counted as empty, so the estimate asks for more room, not less
            continue
        for entry in entries:
            seen += 1
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total
