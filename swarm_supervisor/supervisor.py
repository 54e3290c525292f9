"""The supervisor: spawn the workers, restart the ones that crash, run the coordinator, draw the dashboard.

Restart policy is data, as in an OTP supervisor: at most R restarts of one worker within T seconds,
with exponential backoff between them; past that the worker is marked failed and the others go on.
"""

import logging
import multiprocessing as mp      # not torch's: no tensor passes between these processes
import signal
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from configs_env import SwarmConfig
from swarm_supervisor.coordinator import Coordinator
from swarm_supervisor.dashboard import Dashboard
from swarm_supervisor.events import EventJournal, Watches
from swarm_supervisor.handles import RestartPolicy, WorkerHandle
from swarm_supervisor.hangup import on_hangup, print_nowhere, terminal_outputs
from swarm_supervisor.join import SettingsChange
from swarm_supervisor.readable import one_line
from swarm_supervisor.devices import nvml_ids
from swarm_supervisor.status import SwarmReader, SwarmView
from swarm_supervisor.monitor import Monitor, MonitorSnapshot, PeakWindow, ProcessSnapshot
from workers.shared_folder import storage
from workers.shared_folder.drive_sim import simulate_drive
from workers.shared_folder.exchange import read_finished, read_heartbeats
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.jsonl import append_jsonl
from workers.shared_folder.leftovers import remove_stale_temps
from workers.shared_folder.protocol import EVENT_FAILED, EVENT_RESTART, Status
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.signing import KeyRing, NodeKey
from workers.processes import EXIT_CONFIG, EXIT_OUT_OF_MEMORY, WorkerSpec, start_worker

log = logging.getLogger(__name__)

TICK_S = 0.25
MONITOR_S = 1.0
RECORD_S = 5.0
HANG_CHECK_S = 2.0       # how often hung workers and the shared folder's presence are checked
# how often the folder is read for the view when no live table shows it (a pipe's status lines, a notebook's own
# table, the learning alarms): each read lists and verifies every heartbeat and new metrics line, CPU the
# workers' launches share. On an object store a live table too: there a read is billed listings (6 for 4 workers)
QUIET_VIEW_S = 1.0
SHUTDOWN_GRACE_S = 30.0
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def view_interval(live_table: bool, on_store: bool) -> float:
    """Seconds between the supervisor's reads of the folder for its view."""
    return TICK_S if live_table and not on_store else QUIET_VIEW_S


MEMORY_POLL_S = 5.0     # how often a restart held back for GPU memory looks again


class Supervisor:
    def __init__(self, cfg: SwarmConfig, specs: list[WorkerSpec], run_coordinator: bool,
                 model_label: str, device_label: str, dashboard: Dashboard | None = None,
                 keyring: KeyRing | None = None, coordinator_key: NodeKey | None = None,
                 claim_lost: Callable[[], str | None] = lambda: None, worker_need_mib: float | None = None,
                 joined_as: str | None = None,
                 settings_changed: Callable[[SwarmConfig], SettingsChange | None] = lambda cfg: None):
        self.cfg = cfg
        self.worker_need_mib = worker_need_mib     # what one worker needs on its GPU (the start's fit check)
        self.folder = ExperimentFolder(cfg.experiment_dir)
        self.keyring = keyring or KeyRing(self.folder)
        self.machine = joined_as      # its events and monitor samples go to this machine's own files
        self.claim_lost = claim_lost       # why this `up` no longer holds the experiment, once it does not
        self.settings_changed = settings_changed    # a joiner's: those its coordinator restarted with (SettingsWatch)
        self.ctx = mp.get_context("spawn")
        # Workers are asked to stop with SIGTERM, not a multiprocessing.Event: a worker killed with -9
        # while waiting on such an Event leaves its lock held, and the next set() blocks forever.
        self.stopping = False
        self.stop_coordinator = threading.Event()
        self.handles = [WorkerHandle(spec) for spec in specs]
        self.policy = RestartPolicy(max_restarts=cfg.max_restarts, window_s=cfg.restart_window,
                                    backoff_s=cfg.restart_backoff)
        self.journal = EventJournal(self.folder.events_file_of(self.machine))
        self.events = self.journal.recent      # the dashboard's newest lines
        self.watch = Watches(self.journal, self.folder.root, cfg.memory_high_water)
        if run_coordinator and coordinator_key is None:
            raise ValueError("a supervisor that runs the coordinator needs the coordinator's key")
        self.coordinator = (Coordinator(cfg, self.folder, self.stop_coordinator, self.local_workers, coordinator_key,
                                        self.keyring, self.event) if run_coordinator else None)
        self.monitor = Monitor(nvml_ids([spec.device for spec in specs], cfg.cuda_visible_devices),
                               pss_every_s=RECORD_S)
        self.snapshot: MonitorSnapshot | None = None
        self.peaks = PeakWindow()           # what monitor.jsonl records: the most of each window's samples
        self.dashboard = dashboard or Dashboard()
        self.reader = SwarmReader(self.folder, cfg, model_label, device_label, self.keyring)
        self.interrupts = 0
        self.hung_up = False
        self.terminal: tuple[int, ...] = ()      # stdout/stderr that are a terminal (hangup.terminal_outputs)
        self.exit_code: int | None = None
        self.failure: str | None = None       # why the swarm stopped with EXIT_FAILED, in one line

    # -- events --------------------------------------------------------------------------------------
    def event(self, message: str, level: str = "info", kind: str | None = None, node: str | None = None) -> None:
        """A line for people (the dashboard, events.jsonl) and, with `kind`, a fact for programs to count."""
        self.journal.add(message, level, kind, node)

    def local_workers(self) -> set[str]:
        return {h.node for h in self.handles if h.alive() or h.restart_at is not None}

    # -- processes -----------------------------------------------------------------------------------
    def _spawn(self, handle: WorkerHandle) -> None:
        handle.process = self.ctx.Process(target=start_worker, args=(handle.spec,),
                                          name=handle.node, daemon=True)
        handle.process.start()
        handle.restart_at = None

    def _reap(self) -> None:
        now = time.monotonic()
        for h in self.handles:
            if h.failed or h.exited_ok or h.stopped:
                continue
            if h.restart_at is not None:
                if now >= h.restart_at and not self.stopping and not self._held_for_memory(h, now):
                    self.event(f"{h.node}: restarting from its last checkpoint (restart {h.total_restarts})",
                               kind=EVENT_RESTART, node=h.node)
                    self._spawn(h)
                continue
            if h.process is None or h.process.is_alive():
                continue
            code = h.process.exitcode
            h.process.join(timeout=1)
            clean = code == 0 or (code == -signal.SIGTERM and h.kill_reason is None)
            if h.respawn_asked and clean and not self.stopping:    # stopped to restart with other settings: no crash
                h.respawn_asked = False
                self._spawn(h)
                continue
            h.respawn_asked = False     # it crashed on its way out: a crash, restarted (with its new spec) as one
            if code == 0:
                h.exited_ok = True
                continue
            h.last_error = h.kill_reason or self.reader.last_error(h.node, h.process.pid) or f"exit code {code}"
            if self.stopping:
                h.stopped = True
                if code == -signal.SIGTERM and h.kill_reason is None:   # asked to stop before it set its handler
                    h.last_error = None
                h.kill_reason = None
                continue
            h.kill_reason = None
            if code == EXIT_OUT_OF_MEMORY and self._held_for_memory(h, now, exited=True):
                continue
            while h.restarts and now - h.restarts[0] > self.policy.window_s:
                h.restarts.popleft()
            if code == EXIT_CONFIG or len(h.restarts) >= self.policy.max_restarts:
                h.failed = True
                why = "a setting or file it cannot work with" if code == EXIT_CONFIG else \
                    f"{len(h.restarts)} restarts within {self.policy.window_s:.0f}s"
                self.event(f"{h.node}: failed ({why}): {h.last_error}", level="error", kind=EVENT_FAILED,
                           node=h.node)
                continue
            if code == EXIT_OUT_OF_MEMORY:
                # restarting the same way would crash the same way: generate in smaller batches
                h.spec = replace(h.spec, generation_splits=h.spec.generation_splits * 2)
                self.event(f"{h.node}: CUDA out of memory; it restarts generating in {h.spec.generation_splits} "
                           "batches")
            h.restarts.append(now)
            h.total_restarts += 1
            delay = self.policy.delay(len(h.restarts))
            h.restart_at = now + delay
            self.event(f"{h.node}: exited with code {code} ({h.last_error}); restart in {delay:.0f}s")

    def _follow_settings(self) -> None:
        """A joiner's workers restart from their checkpoints with the settings its coordinator restarted with."""
        change = None if self.stopping else self.settings_changed(self.cfg)
        for line in change.lines if change else ():
            self.event(line, level="warning")
        if change and change.cfg:
            self.cfg = self.reader.cfg = change.cfg
            for h in self.handles:
                h.restart_with(replace(h.spec, cfg=change.cfg))

    def _held_for_memory(self, h: WorkerHandle, now: float, exited: bool = False) -> bool:
        """Whether a worker that ran out of CUDA memory waits to restart: while its GPU has less free memory
        than a worker needs, another process holds it, and a restart would only crash again and spend the
        worker's restarts. Such a wait counts as no restart and lasts at most RESTART_WINDOW; an out-of-memory
        exit within RESTART_WINDOW after a wait ran out counts as a crash."""
        if exited and (h.memory_wait_gave_up is not None and now - h.memory_wait_gave_up < self.policy.window_s):
            return False
        if not exited and h.memory_wait_since is None:
            return False
        free = self.monitor.free_mib(h.spec.device)
        need = self.worker_need_mib
        if free is None or need is None or free >= need:
            if h.memory_wait_since is not None:
                self.event(f"{h.node}: {free / 1024:.1f} GiB free on {h.spec.device} now" if free is not None
                           else f"{h.node}: GPU memory unknown now")
            h.memory_wait_since = None
            return False
        if h.memory_wait_since is None:
            h.memory_wait_since = now
            h.total_restarts += 1
            self.event(f"{h.node}: CUDA out of memory with {free / 1024:.1f} GiB free on {h.spec.device}, under the "
                       f"~{need / 1024:.1f} GiB a worker needs: another process holds it; the restart waits for "
                       f"room (up to {self.policy.window_s:.0f}s)", level="warning")
        elif now - h.memory_wait_since > self.policy.window_s:
            self.event(f"{h.node}: still {free / 1024:.1f} GiB free on {h.spec.device} after "
                       f"{self.policy.window_s:.0f}s; restarting it anyway", level="warning")
            h.memory_wait_since, h.memory_wait_gave_up = None, now
            return False
        h.restart_at = now + MEMORY_POLL_S
        return True

    def _kill_hung(self) -> None:
        """A worker stuck in one stage (a deadlock, a wedged GPU call) is killed; _reap restarts it."""
        try:
            beats = read_heartbeats(self.folder, self.keyring)
        except OSError as exc:     # a Drive hiccup: the next check, HANG_CHECK_S on, looks again
            log.warning("hang check skipped: %s", exc)
            return
        now = time.time()
        for h in self.handles:
            beat = beats.get(h.node)
            if not h.alive() or beat is None or beat.pid != h.process.pid or beat.status in Status.IDLE:
                continue
            stuck = now - max(beat.progress_at, beat.started_at)
            if stuck > self.cfg.worker_hang_timeout:
                h.kill_reason = f"hung: no progress for {stuck:.0f}s in stage {beat.status!r}"
                self.event(f"{h.node}: {h.kill_reason}; killing it")
                h.process.kill()
                h.process.join(timeout=5)

    # -- the loop ------------------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, _frame: Any = None) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.event("stop requested: workers finish their files and save checkpoints" +
                       ("" if self.hung_up else " (again to kill now)"))
            self._ask_workers_to_stop()
            self.stop_coordinator.set()
            self.exit_code = EXIT_INTERRUPTED
        else:
            self._kill_all("killed by a second stop request")

    def hang_up(self, signum: int | None = None, _frame: Any = None) -> None:
        """The terminal closed (an SSH session dropped, its window shut): stop as on Ctrl-C, so every worker saves
        a checkpoint of its last round, and print nowhere on it from now on (a write to it fails). A hang-up
        after a stop began (the shell's, then the kernel's as the shell exits) is the same stop, not a kill."""
        print_nowhere(self.terminal)
        stopping, self.hung_up = self.hung_up or self.interrupts, True
        if not stopping:
            self.event("the terminal hung up: the swarm stops as on Ctrl-C (resumable)", level="warning")
            self.request_stop(signum)

    def run(self) -> int:
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        self.terminal = terminal_outputs()
        if (before := on_hangup(self.hang_up)) is not None:      # under nohup it stays ignored
            previous[signal.SIGHUP] = before
        # the coordinator and the dashboard's reader share this process's view of a simulated slow Drive
        simulate_drive(self.folder.root, self.cfg.drive_sim_lag, self.cfg.drive_sim_fail_rate,
                       seed=self.cfg.seed * 1000, stale_s=self.cfg.drive_sim_stale,
                       hangup_flag=self.cfg.drive_sim_hangup)
        try:
            return self._run()
        finally:
            self._shutdown()
            simulate_drive(self.folder.root, 0, 0)     # the run's summary and validation read the real folder
            for s, handler in previous.items():      # after a hang-up, a late one must not end the summary
                signal.signal(s, signal.SIG_IGN if s == signal.SIGHUP and self.hung_up else handler)
            self.monitor.close()

    def _run(self) -> int:
        self.folder.create()
        remove_stale_temps(self.folder.root)      # of writes killed in an earlier run; live writers' are kept
        for h in self.handles:
            self._spawn(h)
        if self.coordinator:   # after the spawns, so round 1 already lists every local worker
            self.coordinator.start()
        self.event(f"started {len(self.handles)} workers" + (" and the coordinator" if self.coordinator else ""))
        self.dashboard.start()
        last_sample = last_record = last_hang_check = last_view = float("-inf")
        view_every = view_interval(self.dashboard.live, storage.mounted(self.folder.state_dir) is not None)
        while self.exit_code is None:
            now = time.monotonic()
            if now - last_hang_check >= HANG_CHECK_S:
                self.watch.folder()
                self._kill_hung()
                self._follow_settings()
                last_hang_check = now
            self._reap()
            if now - last_sample >= MONITOR_S:
                self.snapshot = self.monitor.sample(h.process.pid for h in self.handles if h.alive())
                self.watch.memory(self.snapshot)
                self.peaks.add(self.snapshot, self._nodes_by_pid())
                last_sample = now
            if now - last_record >= RECORD_S:
                self._record(self.peaks.take())
                last_record = now
            if now - last_view >= view_every:
                view = self._view()
                self.watch.learning(view)
                self.watch.refusals(view)
                self.dashboard.update(view)
                last_view = now
            verdict = self._verdict()
            # a stop signal's handler runs between any two lines of this loop and sets exit_code itself: the
            # verdict must not overwrite it with None (the loop then ran on with every worker stopped, seen in CI)
            self.exit_code = verdict if verdict is not None else EXIT_INTERRUPTED if self.interrupts else None
            if self.exit_code is None:
                time.sleep(TICK_S)
        return self.exit_code

    def _view(self) -> SwarmView:
        return self.reader.view(self.handles, self.snapshot, self.events,
                                self.coordinator.instance if self.coordinator else None,
                                self.coordinator.round if self.coordinator else None)

    def _nodes_by_pid(self) -> dict[int, str]:
        return {h.process.pid: h.node for h in self.handles if h.process is not None}

    def _record(self, window: tuple[MonitorSnapshot, dict[str, ProcessSnapshot]] | None) -> None:
        """Per-node GPU/RAM/CPU over time (memory as the most a window's samples saw: PeakWindow), for plots and for
        checking the memory budget after a run."""
        if window is None:
            return
        snapshot, processes = window
        nodes = {h.node: {"gpu_mib": proc.gpu_mib, "rss_mib": proc.rss_mib, "pss_mib": proc.pss_mib,
                          "cpu_pct": proc.cpu_pct,
                          "device": h.spec.device} for h in self.handles if (proc := processes.get(h.node))}
        devices = snapshot.devices
        try:
            append_jsonl(self.folder.monitor_file_of(self.machine), {
                "time": snapshot.taken_at, "nodes": nodes, "supervisor_cpu_pct": snapshot.supervisor_cpu_pct,
                # summed over the GPUs, as one-GPU runs recorded it; "devices" holds each one
                "device_used_mib": sum(d.used_mib for d in devices) if devices else None,
                "device_total_mib": sum(d.total_mib for d in devices) if devices else None,
                "devices": {d.label: {"used_mib": d.used_mib, "total_mib": d.total_mib} for d in devices}})
        except (OSError, RejectedFile) as exc:     # away, hung up, or a file planted where the samples go
            log.warning("monitor sample not written: %s", exc)

    def _verdict(self) -> int | None:
        coordinator = self.coordinator
        # its thread ended before the last round: no round would start again, and this loop would wait for ever
        if coordinator and not coordinator.is_alive() and not coordinator.finished.is_set() \
                and not self.stop_coordinator.is_set():
            why = one_line(coordinator.error) if coordinator.error else "it stopped without saying why"
            return self._fail(f"coordinator failed: {why}")
        if self.handles and all(h.failed for h in self.handles):
            return self._fail("every worker failed; stopping the swarm")
        lost = self.claim_lost()
        if lost:
            return self._fail(lost)
        finished = self.coordinator.finished.is_set() if self.coordinator else \
            read_finished(self.folder, self.keyring) is not None
        if finished and all(h.failed or h.exited_ok for h in self.handles):
            failed = [h.node for h in self.handles if h.failed]
            return EXIT_FAILED if failed else EXIT_OK
        return None

    def _fail(self, reason: str) -> int:
        self.failure = reason
        self.event(reason, level="warning")
        return EXIT_FAILED

    def _ask_workers_to_stop(self) -> None:
        """SIGTERM: each worker finishes the file it is writing, saves a checkpoint and exits 0."""
        self.stopping = True
        for h in self.handles:
            if h.alive():
                h.process.terminate()

    def _shutdown(self) -> None:
        # every live worker, even after a stop began: one spawned since (a restart, the first spawns) was not asked
        self._ask_workers_to_stop()
        self.stop_coordinator.set()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        # sampled as in the run while the workers take their last checkpoints: the run's last record holds them
        while (alive := [h for h in self.handles if h.alive()]) and time.monotonic() < deadline:
            self.peaks.add(self.monitor.sample(h.process.pid for h in alive), self._nodes_by_pid())
            alive[0].process.join(timeout=min(MONITOR_S, max(0.1, deadline - time.monotonic())))
        self._record(self.peaks.take())      # the samples since the last record: a short run's only ones
        self._kill_all(f"killed: it did not stop within {SHUTDOWN_GRACE_S:.0f}s")
        if self.coordinator and self.coordinator.is_alive():
            self.coordinator.join(timeout=5)
        try:
            self._reap()            # how each process ended, for the last view and the run's summary
            self.watch.folder()     # a folder back since the last check: the swarm can finish within its 2 s
            view = self._view()
            self.watch.learning(view)   # the last evaluations, which the workers wrote as they left
            self.journal.flush()    # what is still waiting then, the run's summary prints
            self.dashboard.update(view)
        finally:
            self.dashboard.stop()

    def _kill_all(self, why: str) -> None:
        for h in self.handles:
            if h.process is not None and h.process.is_alive():
                h.kill_reason = why
                h.process.kill()
                h.process.join(timeout=5)
