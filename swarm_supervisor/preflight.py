"""What `rl-swarm up` checks and settles before any process starts: the folders it writes, each worker's device and
name, the model, whether the workers fit on their GPUs, and whether the disk holds their checkpoints."""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from configs_env import ConfigError, SwarmConfig
from swarm_supervisor.devices import device_fits, refuse_unfit, worker_devices, nvml_ids
from swarm_supervisor.disk_room import disk_warning
from swarm_supervisor.ram_room import ram_warning
from swarm_supervisor.monitor import Monitor
from workers.shared_folder.folder import ExperimentFolder


PROBE_PREFIX = ".rl-swarm-probe."      # a hidden name: no listing of the folder shows it
COLAB_DRIVE = Path("/content/drive")     # where Colab mounts Google Drive (drive.mount)
GDRIVE_FIX = "set GDRIVE_PATH to a folder this machine can write (on Colab, under the mounted Drive); a missing one " \
             "is made"


def shown_path(label: str, path: Path) -> str:
    """`GDRIVE_PATH=swarm-drive (/home/me/swarm-drive)`: the value as set, and where a relative one points."""
    return f"{label}={path}" + ("" if path.is_absolute() else f" ({path.absolute()})")


def _write_error(folder: Path) -> OSError | None:
    """Whether this process can write in `folder`, tried by writing (and removing) a hidden file there: permission
    bits do not say it for root, a read-only mount, /proc or a Drive mount that refuses writes."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=PROBE_PREFIX)
    except OSError as exc:
        return exc
    try:
        os.close(fd)
    except OSError:         # a Drive mount may report a quota or I/O error at close: the folder took the file
        pass
    finally:
        with contextlib.suppress(OSError):      # never left behind, whatever the close said
            os.unlink(probe)
    return None


def _why(error: OSError) -> str:
    return error.strerror or str(error)


def check_writable_folder(label: str, path: Path, fix: str, probe: bool = True) -> None:
    """Refuse, in one line naming `label` (GDRIVE_PATH, --dist), a `path` that cannot hold the files a command
    writes: a file, a link to nothing, a folder this process cannot write, or a missing one whose nearest existing
    parent is any of those (a missing folder is tried in that parent, and made by the command when it writes, as
    always: a command refused later, by another setting, has made nothing). `fix` ends the line. Without `probe`,
    only what `path` is, not whether it can be written (a folder inside it is tried instead)."""
    shown, target = shown_path(label, path), Path(os.path.abspath(path))
    if target.is_relative_to(COLAB_DRIVE) and not os.path.ismount(COLAB_DRIVE):
        # /content is the runtime's own disk: the folder would be made there, unseen by any other runtime, and
        # lost with this one
        raise ConfigError(f"{shown}: Google Drive is not mounted at {COLAB_DRIVE}; mount it first (from "
                          "google.colab import drive; drive.mount('/content/drive')), or set GDRIVE_PATH elsewhere")
    nearest = target
    try:
        while not nearest.exists():           # follows links: GDRIVE_PATH may itself be a link to the Drive
            if nearest.is_symlink():
                raise ConfigError(f"{shown}: {nearest} is a link to nothing ({os.readlink(nearest)}); {fix}")
            if nearest.parent == nearest:
                break
            nearest = nearest.parent
        if not nearest.is_dir():
            where = "" if nearest == target else f"{nearest} is "
            kind = "a file, not a folder" if nearest.is_file() else "not a folder"
            raise ConfigError(f"{shown}: {where}{kind}; {fix}")
    except OSError as exc:          # EACCES on a parent, ENOTCONN of a dropped Drive mount
        raise ConfigError(f"{shown}: cannot be looked at ({_why(exc)}); {fix}") from None
    error = _write_error(nearest) if probe else None
    if error is not None:
        where = "not writable" if nearest == target else f"cannot be made: {nearest} is not writable"
        raise ConfigError(f"{shown}: {where} ({_why(error)}); {fix}")


def check_gdrive_path(cfg: SwarmConfig, experiment: bool = False) -> None:
    """GDRIVE_PATH checked once, before any process starts, by a command that writes there: one line naming it and
    the fix rather than a traceback from deep in the start. Its experiments/ too where it exists, and with
    `experiment` EXPERIMENT_NAME's folder. With SWARM_URL the swarm's records are in the bucket, but checkpoints,
    the base model and logs stay under GDRIVE_PATH, so it is checked all the same."""
    inner = [("GDRIVE_PATH", str(cfg.gdrive_path), cfg.gdrive_path / "experiments")]
    if experiment:
        inner.append(("EXPERIMENT_NAME", cfg.experiment_name, cfg.experiment_dir))
    existing = [level for level in inner if os.path.lexists(level[2])]
    # a swarm writes into its experiment's folder alone: only the deepest of these folders that is there is tried
    # (a GDRIVE_PATH this machine may not write, with an experiments/ or an experiment it may, is a setup that
    # works); the other commands write into GDRIVE_PATH itself (dist/, plots/, tables/)
    deepest = existing[-1] if existing and experiment else ("GDRIVE_PATH", str(cfg.gdrive_path), None)
    check_writable_folder("GDRIVE_PATH", cfg.gdrive_path, GDRIVE_FIX, probe=deepest[2] is None)
    for label, value, folder in existing:
        fix = f"move it away, or set another {label}"
        if not folder.exists():
            raise ConfigError(f"{label}={value}: {folder} is a link to nothing; {fix}")
        if not folder.is_dir():
            raise ConfigError(f"{label}={value}: {folder} is a file, not a folder; {fix}")
    label, value, folder = deepest
    if folder is not None:
        error = _write_error(folder)
        if error is not None:
            raise ConfigError(f"{label}={value}: {folder} is not writable ({_why(error)}); give this machine write "
                              f"access to it, or set another {label}")


def resolve_devices(cfg: SwarmConfig, gpus: int) -> tuple[list[str], str | None]:
    """Each worker's device (devices.worker_devices), and a note when DEVICE=auto finds no GPU."""
    note = "CUDA is not available: the workers run on the CPU" if cfg.device == "auto" and gpus == 0 else None
    return worker_devices(cfg.device, cfg.num_workers, gpus), note


def resolve_model(cfg: SwarmConfig) -> tuple[str, str | None]:
    """The model every worker loads; built or checked here once, before any process starts, with room in its
    context for the tasks' prompts and MAX_NEW_TOKENS."""
    from workers.learning.model import check_prompt_room, ensure_model_available, resolve_default_model

    if cfg.model_name is None:
        name, note = resolve_default_model(cfg.cache_dir)
    else:
        name, note = cfg.model_name, None
    ensure_model_available(name, cfg.cache_dir)
    check_prompt_room(name, cfg.cache_dir, cfg.tasks, cfg.max_new_tokens)
    return name, note


def model_config(cfg: SwarmConfig, model_name: str):  # noqa: ANN201 - a transformers PretrainedConfig
    """The model's config alone (no weights loaded), from where resolve_model put or found it."""
    from transformers import AutoConfig

    from workers.learning.hub import offline_kwargs
    from workers.learning.model import model_source

    source = model_source(model_name, cfg.cache_dir)
    return AutoConfig.from_pretrained(source, **offline_kwargs(source))


def worker_need_mib(cfg: SwarmConfig, model_name: str, device: str) -> float:
    """The estimate of one worker's GPU memory for this model and these settings."""
    import torch

    from workers.learning.memory import estimate_worker_mib
    from workers.learning.model import use_activation_checkpointing

    checkpointing = use_activation_checkpointing(cfg.gradient_checkpointing, torch.device(device))
    return estimate_worker_mib(model_config(cfg, model_name), cfg, checkpointing)


def warn_short_disk(configs: list[SwarmConfig], model_name: str, on_cuda: bool) -> None:
    """Say so when the disk under GDRIVE_PATH will not hold the checkpoints of these swarms' workers."""
    swarms = [(ExperimentFolder(c.experiment_dir), worker_names(c)) for c in configs]
    warning = disk_warning(configs[0].gdrive_path, swarms, model_config(configs[0], model_name), on_cuda, model_name)
    if warning:
        print(f"rl-swarm: {warning}")


def warn_short_ram(workers: int, cfg: SwarmConfig, model_name: str, on_cuda: bool) -> None:
    """Say so when this machine's RAM will not hold `workers` workers (those running at once) at their peak."""
    warning = ram_warning(workers, model_config(cfg, model_name), on_cuda, model_name)
    if warning:
        print(f"rl-swarm: {warning}")


def check_fit(cfg: SwarmConfig, gpus: int, need_mib: float, monitor: Monitor | None = None) -> None:
    """Refuse a swarm that cannot fit on its GPUs, before any worker starts, naming the GPU that is short and how
    many workers would fit."""
    _refuse_unfit(cfg, gpus, free_mib(worker_devices(cfg.device, cfg.num_workers, gpus), cfg, monitor), need_mib)


def settle_fit(cfg: SwarmConfig, gpus: int, need_of: Callable[[SwarmConfig], float],
               monitor: Monitor | None = None) -> tuple[SwarmConfig, float]:
    """check_fit, with UPDATE_GRAPHS=auto settled first (settle_graphs). Returns the settings the workers run with
    and what one of them needs."""
    devices = worker_devices(cfg.device, cfg.num_workers, gpus)
    free = free_mib(devices, cfg, monitor)
    [cfg], need = settle_graphs([cfg], devices, free, need_of)
    _refuse_unfit(cfg, gpus, free, need)
    return cfg, need


def settle_graphs(configs: list[SwarmConfig], devices: list[str], free: dict[str, float],
                  need_of: Callable[[SwarmConfig], float]) -> tuple[list[SwarmConfig], float]:
    """Workers of these settings placed on `devices`: with UPDATE_GRAPHS=auto, the update's CUDA graphs where every
    GPU has room for them, else an eager update (said in one line) rather than a refusal of workers that fit without
    them. Returns the settings they run with and the most one of them needs."""
    need = max(map(need_of, configs))
    graphed = [c.update_graphs == "auto" and c.graphed_update for c in configs]
    short = [fit for fit in device_fits(devices, free, need, configs[0].memory_high_water) if fit.workers > fit.room]
    if not short or not any(graphed):
        return configs, need
    configs = [c.with_overrides(update_graphs="off") if g else c for c, g in zip(configs, graphed)]
    eager_need = max(map(need_of, configs))
    print(f"rl-swarm: UPDATE_GRAPHS=auto: with the update's CUDA graphs a worker needs ~{need / 1024:.1f} GiB and "
          f"{short[0].device} has room for {short[0].room} of its {short[0].workers}; the update runs eagerly "
          f"(~{eager_need / 1024:.1f} GiB a worker)")
    return configs, eager_need


def free_mib(devices: list[str], cfg: SwarmConfig, monitor: Monitor | None = None) -> dict[str, float]:
    """Each of these GPUs' free memory by NVML, keyed as the workers name their devices; none without NVML."""
    monitor = monitor or Monitor(nvml_ids(devices, cfg.cuda_visible_devices))
    try:
        snapshot = monitor.sample([])
    finally:
        monitor.close()
    return {device.label: device.free_mib for device in snapshot.devices}     # no NVML: nothing to check against


def _refuse_unfit(cfg: SwarmConfig, gpus: int, free: dict[str, float], need_mib: float) -> None:
    fits = device_fits(worker_devices(cfg.device, cfg.num_workers, gpus), free, need_mib, cfg.memory_high_water)
    for fit in fits:
        print(f"rl-swarm: {fit.line(need_mib)}")
    refuse_unfit(fits, need_mib, cfg.num_workers, lambda n: worker_devices(cfg.device, n, gpus))


def worker_names(cfg: SwarmConfig) -> list[str]:
    if cfg.num_workers == 1 and cfg.node_id != "worker":
        return [cfg.node_id]
    return [f"{cfg.node_id}-{i}" for i in range(1, cfg.num_workers + 1)]
