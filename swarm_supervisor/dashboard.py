"""Renders SwarmView snapshots: a live rich table in a terminal, a compact status line anywhere else.

Nothing here measures or reads files: the monitor and the status reader build the snapshots, this only draws them,
so every field may be None (not measured yet, no GPU) and is shown as "N/A" or "-". Every string may come from
the shared folder, so each is drawn through swarm_supervisor.readable: escaped, never read as markup.
"""

import logging
import math
import time

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from swarm_supervisor.experiments import mean_or_none
from swarm_supervisor.monitor import DeviceSnapshot
from swarm_supervisor.readable import FittedTable, Packed, cell, plain
from swarm_supervisor.status import NodeRow, SwarmView
from workers.shared_folder.protocol import Status

SPARK = "▁▂▃▄▅▆▇█"
BAR_WIDTH = 20
STATUS_WIDTH = 48                 # status and the start of last_error
COLUMNS = ("node", "role", "status", "round", "reward", "trend", "acc", "held-out", "loc+ext", "device", "GPU MiB",
           "RAM MiB", "restarts", "beat")
RIGHT_ALIGNED = frozenset(COLUMNS) - {"node", "role", "status", "trend", "device"}
EVENTS_SHOWN = 5
STATUS_STYLE = {Status.FAILED: "bold red", Status.CRASHED: "red", Status.RESTARTING: "yellow", Status.DONE: "green",
                Status.STOPPED: "dim", Status.TRAINING: "cyan", Status.GENERATING: "magenta", Status.FETCHING: "blue",
                Status.EVALUATING: "bright_blue", Status.WAITING_FOR_COORDINATOR: "yellow"}
TROUBLE = Status.TROUBLE
NOT_RUNNING = Status.TROUBLE + (Status.STOPPED, Status.DONE)

log = logging.getLogger(__name__)


def format_duration(seconds: float | None) -> str:
    """21h04m, 3m05s or 12s; "-" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _num(value: float | None, fmt: str) -> str:
    return "N/A" if value is None else format(value, fmt)


def _mib(value: float | None) -> str:
    return _num(value, ",.0f")


def _gib_pair(device: DeviceSnapshot) -> str:
    return f"{device.used_mib / 1024:.1f}/{device.total_mib / 1024:.1f} GiB"


def _gpu_summary(devices: tuple[DeviceSnapshot, ...]) -> str:
    """`GPU 77.1/79.6 GiB` for one GPU, `GPU cuda:0 77.1/79.6 GiB, cuda:1 3.0/79.6 GiB` for several."""
    if not devices:
        return "GPU N/A"
    if len(devices) == 1:
        return f"GPU {_gib_pair(devices[0])}"
    return "GPU " + ", ".join(f"{device.label} {_gib_pair(device)}" for device in devices)


def _rate(rounds_per_hour: float | None) -> str:
    if not rounds_per_hour:
        return "- rounds/h"
    return f"{rounds_per_hour:.1f} rounds/h" if rounds_per_hour < 10 else f"{rounds_per_hour:.0f} rounds/h"


def sparkline(values: tuple[float, ...]) -> str:
    """One block character per value, scaled between the lowest and the highest; a flat series sits at the bottom."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    if high == low:
        return SPARK[0] * len(finite)
    return "".join(SPARK[min(7, int((v - low) / (high - low) * 8))] for v in finite)


def _memory_lines(devices: tuple[DeviceSnapshot, ...], label: str) -> list[Text]:
    """One bar per GPU the workers use; where NVML reads none, what they run on."""
    if not devices:
        return [Text(f"GPU: N/A ({plain(label)})", style="dim")]
    return [_memory_line(device) for device in devices]


def _memory_line(device: DeviceSnapshot) -> Text:
    label = plain(device.label)
    share = device.used_mib / device.total_mib if device.total_mib > 0 else 0.0
    share = share if math.isfinite(share) else 0.0
    style = "red" if share > 0.95 else "yellow" if share > 0.85 else "green"
    filled = max(0, min(BAR_WIDTH, round(share * BAR_WIDTH)))
    util = "" if device.utilization_pct is None else f" · util {device.utilization_pct:.0f}%"
    return Text.assemble(f"{label} {device.name} ", ("█" * filled, style), ("░" * (BAR_WIDTH - filled), "dim"),
                         (f" {_mib(device.used_mib)}/{_mib(device.total_mib)} MiB ({share:.0%})", style), util)


def _status_cell(row: NodeRow) -> Text:
    status = cell(row.status, STATUS_STYLE.get(row.status, ""))
    if row.last_error and row.last_error.strip():
        status.append(" " + plain(row.last_error.strip().splitlines()[-1]), style="red")   # a traceback's last line
    elif row.learning_alarm:
        status.append(" " + plain(row.learning_alarm), style="red")
    elif row.note and row.note.strip():
        status.append(" " + plain(row.note.strip().splitlines()[0]), style="yellow")
    return status


def _beat(row: NodeRow) -> Text:
    """The heartbeat's age, with "late" or "gone" when the coordinator would say so."""
    if row.heartbeat_age_s is None:
        return Text("-")
    age = format_duration(row.heartbeat_age_s)
    if row.liveness == "late":
        return Text(f"{age} late", style="yellow")
    if row.liveness == "gone" and row.status not in NOT_RUNNING:
        return Text(f"{age} gone", style="red")
    return Text(age)


def _rollouts(row: NodeRow) -> str:
    if row.local_rollouts is None and row.external_rollouts is None:
        return "-"
    return f"{row.local_rollouts if row.local_rollouts is not None else '-'}+" \
           f"{row.external_rollouts if row.external_rollouts is not None else '-'}"


def _held_out(row: NodeRow) -> Text:
    """"12→42% (best 45)": from the start to the newest evaluation, and the best; red when the node unlearns."""
    if row.held_out is None and row.held_out_start is None:
        return Text("-")
    style = "bold red" if row.learning_alarm else "bold"
    if row.held_out is None or row.held_out_start is None:
        return Text(f"{row.held_out if row.held_out is not None else row.held_out_start:.0%}", style=style)
    text = f"{row.held_out_start * 100:.0f}→{row.held_out:.0%}"
    if row.held_out_best is not None and row.held_out_best > max(row.held_out, row.held_out_start):
        text += f" (best {row.held_out_best * 100:.0f})"
    return Text(text + (" ↓" if row.learning_alarm else ""), style=style)


def _cells(row: NodeRow, columns: tuple[str, ...]) -> list[Text]:
    cells = [cell(row.node_id), cell(row.role), _status_cell(row), Text("-" if row.round is None else str(row.round)),
            Text(_num(row.reward, ".3f")), Text(sparkline(row.reward_trend), style="cyan"),
            Text("N/A" if row.accuracy is None else f"{row.accuracy:.0%}"), _held_out(row),
            Text(_rollouts(row)), cell(row.device or "-"),
            Text(_mib(row.gpu_mib)), Text(_mib(row.ram_mib)), Text(str(row.restarts)), _beat(row)]
    return [text for name, text in zip(COLUMNS, cells) if name in columns]


def _columns(view: SwarmView) -> tuple[str, ...]:
    """The device column only where the workers are spread over devices: with one, the memory bar names it."""
    spread = len({row.device for row in view.nodes if row.role == "worker" and row.device}) > 1
    return COLUMNS if spread else tuple(name for name in COLUMNS if name != "device")


def _ending(view: SwarmView) -> str:
    """"ETA 3m30s" while the swarm runs; a stopped one will not get there, so it says what it is."""
    return f"ETA {format_duration(view.eta_s)}" if view.phase == "running" else plain(view.phase)


def render(view: SwarmView, whole: bool = False) -> Group:
    """The whole frame: header, device memory, the nodes, the newest events.

    The nodes are a table, one line each, where the width holds it, else one block per node. In the table a
    node's error is cut to its line unless `whole` (`rl-swarm status` prints a snapshot, not a live frame).
    """
    header = [Text.assemble(("rl-swarm ", "bold"), plain(view.experiment)), cell(view.model),
              Text.assemble(("round ", "bold"), f"{view.round}/{view.max_rounds}"),
              Text(f"elapsed {format_duration(view.elapsed_s)}"), Text(_rate(view.rounds_per_hour)),
              Text(_ending(view))]
    if view.rejected_files:
        header.append(Text(f"rejected files {view.rejected_files}", style="yellow"))
    columns = _columns(view)
    nodes = FittedTable(columns, [_cells(node, columns) for node in view.nodes], right=RIGHT_ALIGNED, flexible="status",
                        flexible_width=(len(Status.RESTARTING), STATUS_WIDTH), cut=not whole)
    parts = [Packed(header), *_memory_lines(view.devices, view.device_label), nodes]
    if view.events:
        parts.append(Text("\n".join(plain(event) for event in view.events[-EVENTS_SHOWN:]), style="dim"))
    return Group(*parts)


def status_line(view: SwarmView) -> str:
    """One plain line for pipes, notebooks and CI logs."""
    workers = [n for n in view.nodes if n.role == "worker"]
    starting = sum(n.status == Status.STARTING for n in workers)     # loading its model: not in a round yet
    running = sum(n.status not in NOT_RUNNING for n in workers) - starting
    reward = mean_or_none([n.reward for n in workers])
    acc = mean_or_none([n.accuracy for n in workers])
    held_out = mean_or_none([n.held_out if n.held_out is not None else n.held_out_start for n in workers])
    speed = f"{3600 / view.rounds_per_hour:.1f} s/round" if view.rounds_per_hour else "- s/round"
    gpu = _gpu_summary(view.devices)
    counts = f"{running}/{len(workers)} workers running" + (f", {starting} starting" if starting else "")
    line = (f"[rl-swarm] exp={view.experiment} round {view.round}/{view.max_rounds} | {counts} "
            f"| reward {'-' if reward is None else f'{reward:.3f}'} "
            f"acc {'-' if acc is None else f'{acc:.1%}'} held-out {'-' if held_out is None else f'{held_out:.1%}'} "
            f"| {speed}, {_ending(view)} | {gpu}")
    trouble = [f"{n.node_id}: {n.status}" for n in workers if n.status in TROUBLE]
    trouble += [f"{n.node_id}: {n.liveness}" for n in workers
                if n.liveness in ("late", "gone") and n.status not in NOT_RUNNING]
    trouble += [f"{n.node_id}: {n.learning_alarm}" for n in workers if n.learning_alarm]
    trouble += [f"{n.node_id}: {n.note}" for n in workers if n.note and n.status not in TROUBLE]
    if trouble:
        line += " | " + ", ".join(trouble)
    if view.rejected_files:
        line += f" | rejected files {view.rejected_files}"
    return plain(line)


class Dashboard:
    """A live table in a terminal; in a pipe, CI log or notebook, a status line when something changes; nothing
    when not `shown` (a notebook draws the table itself, from the folder)."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4, line_interval_s: float = 30.0,
                 shown: bool = True):
        self.console = console or Console()
        self.shown = shown
        self.min_gap_s = 1.0 / refresh_per_second if refresh_per_second > 0 else 0.0
        self.line_interval_s = line_interval_s
        self._live: Live | None = None
        self._view: SwarmView | None = None
        self._drawn: SwarmView | None = None     # the view on screen (live) or last printed (lines)
        self._last_draw = float("-inf")
        self._last_key: tuple | None = None
        self._last_line: str | None = None

    @property
    def live(self) -> bool:
        """Whether a live table is drawn (a terminal), redrawn up to `refresh_per_second`."""
        return self.shown and self.console.is_terminal

    def start(self) -> None:
        if self.live and self._live is None:
            self._live = Live(console=self.console, auto_refresh=False, transient=False, redirect_stdout=False,
                              redirect_stderr=False)
            self._live.start()

    def update(self, view: SwarmView) -> None:
        self._view = view
        if not self.shown:
            return
        try:
            if self.console.is_terminal:
                self.start()
                self._draw_live(force=False)
            else:
                self._print_line(force=False)
        except OSError as exc:
            self._terminal_gone(exc)

    def _terminal_gone(self, exc: OSError) -> None:
        """A hung-up terminal fails a write (EIO), often before its SIGHUP arrives: nothing more is drawn."""
        log.warning("the dashboard stops drawing: its terminal is gone (%s)", exc)
        self.shown, self._live = False, None

    def stop(self) -> None:
        """A terminal keeps the last frame on screen; a pipe gets a final status line unless its last one says it."""
        try:
            if self._live is not None:
                self._draw_live(force=True)
                self._live.stop()
                self._live = None
            elif self.shown and not self.console.is_terminal:
                self._print_line(force=True)
        except OSError as exc:
            self._terminal_gone(exc)

    def _draw_live(self, force: bool) -> None:
        now = time.monotonic()
        if self._live is None or self._view is None or self._view is self._drawn:
            return
        # Rate-limited: the supervisor updates on every tick, but redrawing faster than the eye reads only costs CPU.
        if force or now - self._last_draw >= self.min_gap_s:
            self._live.update(render(self._view), refresh=True)
            self._drawn, self._last_draw = self._view, now

    def _print_line(self, force: bool) -> None:
        view = self._view
        if view is None or (force and view is self._drawn):
            return
        now = time.monotonic()
        key = (view.round, tuple((n.node_id, n.status, n.liveness, n.learning_alarm) for n in view.nodes
                                 if n.status in TROUBLE or n.liveness in ("late", "gone") or n.learning_alarm))
        line = status_line(view)
        # the final line repeats the last one when nothing changed since (a run's end printed it twice)
        if (force and line != self._last_line) or key != self._last_key or \
                now - self._last_draw >= self.line_interval_s:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self._drawn, self._last_key, self._last_draw, self._last_line = view, key, now, line

    def __enter__(self) -> "Dashboard":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
