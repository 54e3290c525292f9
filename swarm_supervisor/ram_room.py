"""Before a swarm starts: does this machine's RAM hold its workers? A warning, not a refusal: the estimate is a
measured peak (every worker at a checkpoint at once), and a worker lets its kept checkpoint copy go when the host
runs short (workers.host_copies); but a host that runs out kills processes, and on Colab the whole runtime."""

import psutil

from workers.learning.memory import estimate_worker_host_mib

GIB = 1024 ** 3
SUPERVISOR_MIB = 300        # the supervisor's own process, NVML and the dashboard


def ram_warning(workers: int, config, on_cuda: bool, model_name: str, available: int | None = None) -> str | None:
    """One line when the host's available RAM is short of what `workers` workers of this model will take at their
    peak, naming how many fit; None when they fit."""
    per_worker = estimate_worker_host_mib(config, on_cuda) * 1024 ** 2
    available = psutil.virtual_memory().available if available is None else available
    need = workers * per_worker + SUPERVISOR_MIB * 1024 ** 2
    if need <= available:
        return None
    fit = max(0, int((available - SUPERVISOR_MIB * 1024 ** 2) // per_worker))
    return (f"warning: {workers} workers of {model_name} need ~{need / GIB:.1f} GiB of host RAM at their peak "
            f"(~{per_worker / GIB:.1f} GiB each, from peaks measured by PSS) and this machine has "
            f"{available / GIB:.1f} GiB available; {fit} fit: lower NUM_WORKERS, or use a machine (a Colab runtime) "
            "with more RAM")
