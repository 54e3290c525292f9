"""Snapshots of the GPU (NVML) and of processes (psutil); "no GPU" is a value (None), never an exception."""

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psutil

log = logging.getLogger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceSnapshot:
    name: str
    total_mib: float
    used_mib: float
    free_mib: float
    utilization_pct: float | None
    label: str = "cuda:0"        # the device as the workers name it


@dataclass(frozen=True)
class ProcessSnapshot:
    pid: int
    alive: bool
    rss_mib: float | None
    cpu_pct: float | None
    gpu_mib: float | None     # None: no GPU, or NVML cannot see the process (another PID namespace, no permission)
    # the process's share of the pages it maps (Linux): what it costs the host, where RSS counts in full the CUDA
    # and torch libraries every worker maps; None where the kernel does not say
    pss_mib: float | None = None


@dataclass(frozen=True)
class MonitorSnapshot:
    taken_at: float
    devices: tuple[DeviceSnapshot, ...]      # the GPUs the workers use, in cuda order; () without NVML
    processes: dict[int, ProcessSnapshot]
    supervisor_cpu_pct: float | None
    host_ram_used_mib: float
    host_ram_total_mib: float


def _dead(pid: int) -> ProcessSnapshot:
    return ProcessSnapshot(pid=pid, alive=False, rss_mib=None, cpu_pct=None, gpu_mib=None)


def _text(name: str | bytes) -> str:
    return name if isinstance(name, str) else name.decode(errors="replace")


class Monitor:
    """NVML is initialised once; where it is missing, or cannot see a GPU, that GPU's values stay N/A.

    `gpus` maps each device the workers use (cuda:1) to NVML's index or UUID of it (devices.nvml_ids);
    `nvml` stands in for pynvml in tests.
    """

    def __init__(self, gpus: Mapping[str, int | str] | None = None, nvml: Any = None, pss_every_s: float = 5.0):
        self._nvml = None
        self._handles: dict[str, Any] = {}
        self._warned: set[str] = set()
        # psutil's cpu_percent is the share since the previous call on the same Process object, so keep them.
        self._procs: dict[int, psutil.Process] = {}
        # PSS: the kernel walks a CUDA worker's page tables for it (11 ms for a GPT-2 worker on the H200's host), so
        # each process's is read every `pss_every_s` (the supervisor's record interval), a share of them per sample
        self._pss: dict[int, tuple[float, float | None]] = {}     # pid -> (when read, MiB)
        self._pss_every_s = pss_every_s
        self._pss_due: set[int] = set()
        self._self = psutil.Process()
        self._self.cpu_percent(None)
        gpus = {"cuda:0": 0} if gpus is None else gpus
        if not gpus:
            return
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as exc:
                log.debug("pynvml not installed (%s): GPU values are N/A", exc)
                return
        try:
            nvml.nvmlInit()
        except (nvml.NVMLError, OSError) as exc:
            log.debug("NVML unavailable (%s): GPU values are N/A", exc)
            return
        for label, ident in gpus.items():
            try:
                self._handles[label] = nvml.nvmlDeviceGetHandleByUUID(ident) if isinstance(ident, str) \
                    else nvml.nvmlDeviceGetHandleByIndex(ident)
            except nvml.NVMLError as exc:
                log.warning("NVML has no device %s for %s (%s): its values are N/A", ident, label, exc)
        if not self._handles:
            nvml.nvmlShutdown()
            return
        self._nvml = nvml

    def gpu_available(self) -> bool:
        return self._nvml is not None

    def _device(self, label: str, handle: Any, per_pid: dict[int, float | None]) -> DeviceSnapshot | None:
        """One GPU's memory and use; its processes' memory is added to `per_pid`."""
        nvml = self._nvml
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:      # NOT_SUPPORTED on some MIG slices and vGPUs
                util = None
            for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                for proc in query(handle):
                    used = getattr(proc, "usedGpuMemory", None)   # None where the driver withholds it
                    if used is not None:
                        per_pid[proc.pid] = (per_pid.get(proc.pid) or 0.0) + used / MIB
                    else:
                        per_pid.setdefault(proc.pid, None)
        except nvml.NVMLError as exc:
            # Sampled every second: say it once per device, not once a second.
            log.log(logging.DEBUG if label in self._warned else logging.WARNING, "NVML read of %s failed: %s",
                    label, exc)
            self._warned.add(label)
            return None
        return DeviceSnapshot(name=_text(name), total_mib=memory.total / MIB, used_mib=memory.used / MIB,
                              free_mib=memory.free / MIB, utilization_pct=util, label=label)

    def _devices(self) -> tuple[tuple[DeviceSnapshot, ...], dict[int, float | None]]:
        if self._nvml is None:
            return (), {}
        per_pid: dict[int, float | None] = {}
        read = [self._device(label, handle, per_pid) for label, handle in self._handles.items()]
        return tuple(device for device in read if device is not None), per_pid

    def _process(self, pid: int, gpu: dict[int, float | None]) -> ProcessSnapshot:
        try:
            proc = self._procs.get(pid)
            if proc is not None and not proc.is_running():   # exited, or its pid was reused by another process
                del self._procs[pid]
                self._pss.pop(pid, None)
                return _dead(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)     # the first call only starts the measurement
            with proc.oneshot():
                return ProcessSnapshot(pid=pid, alive=True, rss_mib=proc.memory_info().rss / MIB,
                                       cpu_pct=proc.cpu_percent(None), gpu_mib=gpu.get(pid), pss_mib=self._pss_of(proc))
        except psutil.NoSuchProcess as exc:     # ZombieProcess is one too: exited, not yet reaped
            log.debug("pid %d: %s", pid, exc)
            self._procs.pop(pid, None)
            self._pss.pop(pid, None)
            return _dead(pid)
        except psutil.AccessDenied as exc:      # alive, but another user's: nothing to show
            log.debug("pid %d: %s", pid, exc)
            return ProcessSnapshot(pid=pid, alive=True, rss_mib=None, cpu_pct=None, gpu_mib=gpu.get(pid))

    def _pss_of(self, proc: psutil.Process) -> float | None:
        """The process's PSS: read anew when this sample is its turn (_plan_pss), else the last reading."""
        if proc.pid in self._pss_due:
            self._pss[proc.pid] = (time.monotonic(), _pss_mib(proc))
        return self._pss.get(proc.pid, (0.0, None))[1]

    def _plan_pss(self, wanted: list[int]) -> None:
        """Whose PSS this sample reads: those not read for `pss_every_s`, the stalest first, at most a share of the
        processes per sample (one every pss_every_s / n seconds), so 32 workers' readings are spread over the
        interval instead of stalling one sample for a third of a second."""
        now = time.monotonic()
        stale = sorted((when, pid) for pid in wanted
                       if now - (when := self._pss.get(pid, (-math.inf, None))[0]) >= self._pss_every_s)
        share = max(1, math.ceil(len(wanted) / max(self._pss_every_s, 1.0)))
        self._pss_due = {pid for _, pid in stale[:share]}

    def sample(self, pids: Iterable[int]) -> MonitorSnapshot:
        """One reading of the GPUs, the given processes, this process and host RAM."""
        wanted = list(dict.fromkeys(pids))
        for gone in self._procs.keys() - set(wanted):    # restarted workers get new pids; forget the old ones
            del self._procs[gone]
        for gone in self._pss.keys() - set(wanted):
            del self._pss[gone]
        self._plan_pss(wanted)
        devices, gpu = self._devices()
        ram = psutil.virtual_memory()
        return MonitorSnapshot(taken_at=time.time(), devices=devices,
                               processes={pid: self._process(pid, gpu) for pid in wanted},
                               supervisor_cpu_pct=self._self.cpu_percent(None),
                               host_ram_used_mib=(ram.total - ram.available) / MIB, host_ram_total_mib=ram.total / MIB)

    def free_mib(self, device: str) -> float | None:
        """Free memory on a worker's GPU now, by NVML; None on a CPU or where NVML cannot read it."""
        try:
            devices, _ = self._devices()     # the GPUs alone: the processes' readings (CPU share, PSS turns) stay
        except Exception as exc:  # noqa: BLE001 - NVML raises its own types; the reading is best effort
            log.warning("no GPU memory reading of %s: %s", device, exc)
            return None
        return next((d.free_mib for d in devices if d.label == device), None)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)
            self._nvml = None


def _pss_mib(proc: psutil.Process) -> float | None:
    """The process's proportional set size from /proc/PID/smaps_rollup; None off Linux, or where its maps may not
    be read (another user's process shows its RSS but not its maps)."""
    try:
        pss = getattr(proc.memory_full_info(), "pss", None)
    except psutil.AccessDenied as exc:
        log.debug("pid %d: no PSS: %s", proc.pid, exc)
        return None
    return None if pss is None else pss / MIB


class PeakWindow:
    """The most each node's process and each GPU held across the samples since the last record.

    Samples are taken every second and recorded every few: a record of the sample that happens to fall on it
    misses a checkpoint's or an evaluation's peak of a second or two, and a run shorter than one record interval
    (a test swarm) may never show a worker's GPU memory at all. Memory is the most of the window; the rest is the
    newest sample's. By node, not by process: a worker that crashed out of memory and restarted within the window
    keeps the peak that ended it.
    """

    def __init__(self) -> None:
        self._newest: MonitorSnapshot | None = None
        self._nodes: dict[str, ProcessSnapshot] = {}
        self._device_used: dict[str, float] = {}

    def add(self, snapshot: MonitorSnapshot, nodes: Mapping[int, str]) -> None:
        """One sample; `nodes` names the node each sampled pid runs."""
        self._newest = snapshot
        for pid, now in snapshot.processes.items():
            node = nodes.get(pid)
            if node is None or not now.alive:
                continue
            before = self._nodes.get(node)
            self._nodes[node] = now if before is None else replace(
                now, rss_mib=_most(before.rss_mib, now.rss_mib), gpu_mib=_most(before.gpu_mib, now.gpu_mib),
                pss_mib=_most(before.pss_mib, now.pss_mib))
        for device in snapshot.devices:
            self._device_used[device.label] = max(self._device_used.get(device.label, 0.0), device.used_mib)

    def take(self) -> tuple[MonitorSnapshot, dict[str, ProcessSnapshot]] | None:
        """The window: its newest sample with the GPUs' peaks, and each node seen alive in it with its process's
        peaks (None when nothing was sampled since the last take); a new window starts."""
        newest, nodes, used = self._newest, self._nodes, self._device_used
        self.__init__()
        if newest is None:
            return None
        devices = tuple(replace(d, used_mib=used.get(d.label, d.used_mib)) for d in newest.devices)
        return replace(newest, devices=devices), nodes


def _most(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)
