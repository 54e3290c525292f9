"""Which GPU each worker runs on, and whether each GPU holds its share: decided before any process starts.

DEVICE=auto spreads the workers round robin (worker i on cuda:(i mod GPUs)) rather than by free memory: the
workers are alike, so equal counts are equal memory; the assignment depends on nothing but the worker's index,
so a restarted worker, or a resumed swarm, comes back on the GPU its checkpoint was made on; and the fit check
below can say exactly which GPU is short and what to change. A host whose GPUs are unevenly busy is caught by
that check, never by an out-of-memory crash halfway through a run.
"""

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from configs_env import SwarmError

CPU = "cpu"


def gpu_count() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_devices(requested: str, num_workers: int, gpus: int) -> list[str]:
    """The device of each worker, in worker order; a DEVICE this host cannot honour is one line saying so."""
    if requested == CPU or (requested == "auto" and gpus == 0):
        return [CPU] * num_workers
    if gpus == 0:
        raise SwarmError(f"DEVICE={requested}: CUDA is not available on this machine; use DEVICE=cpu or DEVICE=auto")
    if requested == "auto":
        return [f"cuda:{i % gpus}" for i in range(num_workers)]
    index = int(requested.partition(":")[2] or 0)
    if index >= gpus:
        have = "1 GPU (cuda:0)" if gpus == 1 else f"{gpus} GPUs (cuda:0 to cuda:{gpus - 1})"
        raise SwarmError(f"DEVICE={requested}: this machine has {have}; pin one of them (e.g. DEVICE=cuda:"
                         f"{gpus - 1}) or set DEVICE=auto to spread the workers over all of them")
    return [f"cuda:{index}"] * num_workers


def devices_label(devices: list[str]) -> str:
    """`cuda:0, cuda:1` for the dashboard's header and config.json; one device is just its name."""
    return ", ".join(sorted(set(devices), key=_order)) or CPU


def _order(device: str) -> tuple[int, str]:
    index = device.partition(":")[2]
    return (int(index), device) if index.isdigit() else (-1, device)


def nvml_ids(devices: list[str], visible: str | None) -> dict[str, int | str]:
    """NVML numbers the host's GPUs, CUDA only the visible ones: cuda:i is the i-th entry of CUDA_VISIBLE_DEVICES
    (an index, or a GPU-/MIG- UUID that NVML looks up itself)."""
    listed = [entry.strip() for entry in visible.split(",")] if visible is not None else []
    ids: dict[str, int | str] = {}
    for device in sorted(set(devices), key=_order):
        if not device.startswith("cuda:"):
            continue
        index = int(device.partition(":")[2])
        entry = listed[index] if index < len(listed) else None
        ids[device] = index if visible is None or entry is None else int(entry) if entry.isdigit() else entry
    return ids


@dataclass(frozen=True)
class DeviceFit:
    device: str
    workers: int          # the workers the assignment puts there
    free_mib: float
    room: int             # the workers that fit in its free memory below the high-water mark

    def line(self, need_mib: float) -> str:
        return (f"{self.device}: {self.workers} worker{'s' if self.workers != 1 else ''}, ~{need_mib / 1024:.1f} GiB "
                f"each, {self.free_mib / 1024:.1f} GiB free: room for {self.room}")


def device_fits(devices: list[str], free_mib: dict[str, float], need_mib: float, high_water: float) -> list[DeviceFit]:
    """Each GPU with a reading against the workers assigned to it; a GPU NVML cannot read is not checked."""
    counts = Counter(devices)
    return [DeviceFit(device, counts[device], free_mib[device], int(free_mib[device] * high_water // need_mib))
            for device in sorted(counts, key=_order) if device in free_mib]


def refuse_unfit(fits: list[DeviceFit], need_mib: float, num_workers: int,
                 assign: Callable[[int], list[str]]) -> None:
    """One line naming the first GPU that is short, and the largest NUM_WORKERS whose assignment fits everywhere."""
    short = [fit for fit in fits if fit.workers > fit.room]
    if not short:
        return
    rooms = {fit.device: fit.room for fit in fits}
    fitting = next((n for n in range(num_workers - 1, 0, -1)
                    if all(count <= rooms.get(device, count) for device, count in Counter(assign(n)).items())), 0)
    fit = short[0]
    fix = f"set NUM_WORKERS={fitting}" if fitting else "free memory on it, or pin another GPU with DEVICE=cuda:N"
    raise SwarmError(f"NUM_WORKERS={num_workers} puts {fit.workers} workers on {fit.device}, needing "
                     f"~{fit.workers * need_mib / 1024:.0f} GiB, but it has {fit.free_mib / 1024:.0f} GiB free: at "
                     f"most {fit.room} fit there ({fix}, or lower MAX_NEW_TOKENS / NUM_GENERATIONS)")
