"""Snapshots of the GPU (NVML) and of processes (psutil); "no GPU" is a value (None), never an exception."""

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ProcessSnapshot:
    pid: int
    alive: bool
    rss_mib: float | None
    cpu_pct: float | None
    gpu_mib: float | None     # None: no GPU, or NVML cannot see the process (another PID namespace, no permission)


@dataclass(frozen=True)
class MonitorSnapshot:
    taken_at: float
    device: DeviceSnapshot | None
    processes: dict[int, ProcessSnapshot]
    supervisor_cpu_pct: float | None
    host_ram_used_mib: float
    host_ram_total_mib: float


def _dead(pid: int) -> ProcessSnapshot:
    return ProcessSnapshot(pid=pid, alive=False, rss_mib=None, cpu_pct=None, gpu_mib=None)


class Monitor:
    """NVML is initialised once; where it is missing every GPU value stays None."""

    def __init__(self, device_index: int = 0):
        self._nvml = None
        self._handle = None
        self._warned = False
        # psutil's cpu_percent is the share since the previous call on the same Process object, so keep them.
        self._procs: dict[int, psutil.Process] = {}
        self._self = psutil.Process()
        self._self.cpu_percent(None)
        try:
            import pynvml
        except ImportError as exc:
            log.debug("pynvml not installed (%s): GPU values are N/A", exc)
            return
        try:
            pynvml.nvmlInit()
        except (pynvml.NVMLError, OSError) as exc:
            log.debug("NVML unavailable (%s): GPU values are N/A", exc)
            return
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except pynvml.NVMLError as exc:
            log.debug("NVML has no device %d (%s): GPU values are N/A", device_index, exc)
            pynvml.nvmlShutdown()
            return
        self._nvml = pynvml

    def gpu_available(self) -> bool:
        return self._nvml is not None

    def _device(self) -> tuple[DeviceSnapshot | None, dict[int, float | None]]:
        if self._nvml is None:
            return None, {}
        nvml = self._nvml
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
            name = nvml.nvmlDeviceGetName(self._handle)
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except nvml.NVMLError:      # NOT_SUPPORTED on some MIG slices and vGPUs
                util = None
            per_pid: dict[int, float | None] = {}
            for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                for proc in query(self._handle):
                    used = getattr(proc, "usedGpuMemory", None)   # None where the driver withholds it
                    per_pid[proc.pid] = None if used is None else used / MIB
        except nvml.NVMLError as exc:
            # Sampled every second: say it once, not once a second.
            log.log(logging.DEBUG if self._warned else logging.WARNING, "NVML read failed: %s", exc)
            self._warned = True
            return None, {}
        device = DeviceSnapshot(name=name if isinstance(name, str) else name.decode(errors="replace"),
                                total_mib=memory.total / MIB, used_mib=memory.used / MIB, free_mib=memory.free / MIB,
                                utilization_pct=util)
        return device, per_pid

    def _process(self, pid: int, gpu: dict[int, float | None]) -> ProcessSnapshot:
        try:
            proc = self._procs.get(pid)
            if proc is not None and not proc.is_running():   # exited, or its pid was reused by another process
                del self._procs[pid]
                return _dead(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)     # the first call only starts the measurement
            with proc.oneshot():
                return ProcessSnapshot(pid=pid, alive=True, rss_mib=proc.memory_info().rss / MIB,
                                       cpu_pct=proc.cpu_percent(None), gpu_mib=gpu.get(pid))
        except psutil.NoSuchProcess as exc:     # ZombieProcess is one too: exited, not yet reaped
            log.debug("pid %d: %s", pid, exc)
            self._procs.pop(pid, None)
            return _dead(pid)
        except psutil.AccessDenied as exc:      # alive, but another user's: nothing to show
            log.debug("pid %d: %s", pid, exc)
            return ProcessSnapshot(pid=pid, alive=True, rss_mib=None, cpu_pct=None, gpu_mib=gpu.get(pid))

    def sample(self, pids: Iterable[int]) -> MonitorSnapshot:
        """One reading of the device, the given processes, this process and host RAM."""
        wanted = list(dict.fromkeys(pids))
        for gone in self._procs.keys() - set(wanted):    # restarted workers get new pids; forget the old ones
            del self._procs[gone]
        device, gpu = self._device()
        ram = psutil.virtual_memory()
        return MonitorSnapshot(taken_at=time.time(), device=device,
                               processes={pid: self._process(pid, gpu) for pid in wanted},
                               supervisor_cpu_pct=self._self.cpu_percent(None),
                               host_ram_used_mib=(ram.total - ram.available) / MIB, host_ram_total_mib=ram.total / MIB)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)
            self._nvml = None
