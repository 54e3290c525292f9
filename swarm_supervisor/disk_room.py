"""Before a swarm starts: does the disk under GDRIVE_PATH hold its workers' checkpoints? A warning, not a refusal:
a swarm whose checkpoint writes fail still trains (each write is tried again the next round), it only resumes
from an older checkpoint after a crash."""

import shutil
from pathlib import Path

from workers.disk_need import bytes_under, worker_checkpoint_bytes
from workers.shared_folder.folder import ExperimentFolder

GIB = 1024 ** 3


def disk_warning(root: Path, swarms: list[tuple[ExperimentFolder, list[str]]], config, on_cuda: bool,
                 model_name: str) -> str | None:
    """One line when the free space under `root` is short of what the `swarms`' workers' checkpoints will take
    (what their checkpoint folders already hold counts as theirs); None when it fits."""
    per_worker = worker_checkpoint_bytes(config, on_cuda)
    workers = sum(len(nodes) for _, nodes in swarms)
    held = sum(bytes_under(folder.checkpoint_dir(node)) for folder, nodes in swarms for node in nodes)
    need = max(0, workers * per_worker - held)
    probe = root
    while not probe.exists() and probe != probe.parent:      # GDRIVE_PATH may not be made yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need <= free:
        return None
    return (f"warning: {root} has {_size(free)} free, and {workers} workers' checkpoints of {model_name} "
            f"will take up to {_size(need)} more ({_size(per_worker)} a worker: "
            f"the checkpoints kept, the one being written and the best model); once the disk is full the "
            "checkpoint writes fail and a restarted worker resumes from an older one: free space, or put "
            "GDRIVE_PATH on a larger disk")


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 1024 ** 2:.0f} MiB"
