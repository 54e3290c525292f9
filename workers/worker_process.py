"""A worker process around `Worker.run`: its log file, its stop signal, its device, and what its exit code says.

`worker_main` is the spawn target (through processes.start_worker); the process talks to the supervisor only
through the shared folder, a stop Event and its exit code (0: finished or stopped on request, non-zero: crashed).
"""

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from configs_env import SwarmError
from workers.processes import (EXIT_CONFIG, EXIT_NO_COORDINATOR, EXIT_OUT_OF_MEMORY, WorkerSpec, cuda_env_defaults,
                               stop_with_parent)
from workers.shared_folder.drive_sim import simulate_drive
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import Status
from workers.shared_folder.appends import open_append
from workers.shared_folder.storage import mount_experiment
from workers.worker import NoCoordinator, Worker

log = logging.getLogger("workers.worker")


def worker_main(spec: WorkerSpec) -> None:
    """Process target (spawn, through processes.start_worker, which leaves Ctrl-C and a terminal's hang-up to the
    supervisor): the supervisor asks us to stop with SIGTERM once it has said why."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop_with_parent(spec.parent_pid)
    folder = ExperimentFolder(spec.cfg.experiment_dir)
    _log_to_folder(folder.log_dir(spec.node))
    mount_experiment(spec.cfg.swarm_url, folder.root, spec.cfg.experiment_name)   # each process mounts its own
    simulate_drive(folder.root, spec.cfg.drive_sim_lag, spec.cfg.drive_sim_fail_rate,
                   seed=spec.cfg.seed * 1000 + spec.index + 1, stale_s=spec.cfg.drive_sim_stale,
                   hangup_flag=spec.cfg.drive_sim_hangup)
    if spec.device == "cpu":
        torch.set_num_threads(1)
    else:
        cuda_env_defaults()         # before this process's first CUDA call
        # a worker on cuda:1 makes no CUDA context on cuda:0 (one would cost every GPU-0 worker ~0.5 GiB)
        try:
            torch.cuda.set_device(torch.device(spec.device))
        except RuntimeError as error:
            if not out_of_cuda_memory(error):
                raise
            log.error("CUDA out of memory making this process's CUDA context on %s: %s", spec.device,
                      str(error).splitlines()[0])
            sys.exit(EXIT_OUT_OF_MEMORY)
    try:
        worker = Worker(spec, stop)
    except SwarmError as error:         # its key: the folder holds another one for this node, or another coordinator
        log.error("%s", error)
        sys.exit(EXIT_CONFIG)
    try:
        worker.run()
    except NoCoordinator as error:
        log.error("%s", error)
        _last_words(worker, str(error))
        sys.exit(EXIT_NO_COORDINATOR)
    except SwarmError as error:
        log.error("%s", error)
        _last_words(worker, str(error))
        sys.exit(EXIT_CONFIG)
    except Exception as error:
        if out_of_cuda_memory(error):
            log.error("CUDA out of memory with generation in %d batch(es): %s", spec.generation_splits,
                      str(error).splitlines()[0])
            _last_words(worker, f"CUDA out of memory (generation in {spec.generation_splits} batches)")
            sys.exit(EXIT_OUT_OF_MEMORY)
        log.exception("worker crashed")
        _last_words(worker, f"{type(error).__name__}: {error}".splitlines()[0][:300])
        raise


def _log_to_folder(log_dir: Path) -> None:
    """Everything the process prints, Python or C level, goes to logs/<node>/worker.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fd = open_append(log_dir / "worker.log")      # never through a link a peer planted at the log's name
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def out_of_cuda_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or the same shortage where CUDA reports it otherwise: making a context
    ("CUDA error: out of memory") or a cuBLAS handle (CUBLAS_STATUS_ALLOC_FAILED) on a GPU others have filled."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("CUDA error: out of memory" in text
                                                 or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _last_words(worker: Worker, message: str) -> None:
    try:
        worker.update(status=Status.CRASHED, last_error=message)
    except OSError as exc:
        log.warning("could not record the error in the heartbeat: %s", exc)
