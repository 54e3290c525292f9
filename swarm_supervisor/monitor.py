"""Snapshots of the GPU (NVML) and of processes (psutil); "no GPU" is a value (None), never an exception."""

import logging
import time
from dataclasses import dataclass
from typing import Iterable

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
    gpu_mib: float | None


@dataclass(frozen=True)
class MonitorSnapshot:
    taken_at: float
    device: DeviceSnapshot | None
    processes: dict[int, ProcessSnapshot]
    supervisor_cpu_pct: float | None
    host_ram_used_mib: float
    host_ram_total_mib: float


class Monitor:
    """NVML is initialised once; where it is missing every GPU value stays None."""

    def __init__(self, device_index: int = 0):
        self._nvml = None
        self._handle = None
        self._procs: dict[int, psutil.Process] = {}
        self._self = psutil.Process()
        self._self.cpu_percent(None)
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors alike
            log.debug("NVML unavailable (%s): GPU values are N/A", exc)

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
            except nvml.NVMLError:
                util = None
            per_pid: dict[int, float | None] = {}
            for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                for proc in query(self._handle):
                    used = getattr(proc, "usedGpuMemory", None)
                    per_pid[proc.pid] = None if used is None else used / MIB
        except nvml.NVMLError as exc:
            log.warning("NVML read failed: %s", exc)
            return None, {}
        device = DeviceSnapshot(name=name if isinstance(name, str) else name.decode(), total_mib=memory.total / MIB,
                                used_mib=memory.used / MIB, free_mib=memory.free / MIB, utilization_pct=util)
        return device, per_pid

    def _process(self, pid: int, gpu: dict[int, float | None]) -> ProcessSnapshot:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)     # the first call only starts the measurement
            with proc.oneshot():
                return ProcessSnapshot(pid=pid, alive=proc.is_running(), rss_mib=proc.memory_info().rss / MIB,
                                       cpu_pct=proc.cpu_percent(None), gpu_mib=gpu.get(pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._procs.pop(pid, None)
            return ProcessSnapshot(pid=pid, alive=False, rss_mib=None, cpu_pct=None, gpu_mib=None)

    def sample(self, pids: Iterable[int]) -> MonitorSnapshot:
        device, gpu = self._device()
        ram = psutil.virtual_memory()
        return MonitorSnapshot(taken_at=time.time(), device=device,
                               processes={pid: self._process(pid, gpu) for pid in pids},
                               supervisor_cpu_pct=self._self.cpu_percent(None),
                               host_ram_used_mib=(ram.total - ram.available) / MIB, host_ram_total_mib=ram.total / MIB)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)
            self._nvml = None
