"""Renders SwarmView snapshots: a live rich table in a terminal, a compact status line anywhere else."""

import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from swarm_supervisor.monitor import DeviceSnapshot

SPARK = "▁▂▃▄▅▆▇█"
STATUS_STYLE = {"failed": "bold red", "crashed": "red", "restarting": "yellow", "done": "green",
                "stopped": "dim", "training": "cyan", "generating": "magenta", "fetching": "blue"}


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    role: str
    status: str
    round: int | None
    stage: int | None
    reward: float | None
    accuracy: float | None
    reward_trend: tuple[float, ...]
    local_rollouts: int | None
    external_rollouts: int | None
    gpu_mib: float | None
    ram_mib: float | None
    restarts: int
    heartbeat_age_s: float | None
    last_error: str | None


@dataclass(frozen=True)
class SwarmView:
    experiment: str
    model: str
    device_label: str
    round: int
    max_rounds: int
    elapsed_s: float
    rounds_per_hour: float | None
    eta_s: float | None
    device: DeviceSnapshot | None
    nodes: tuple[NodeRow, ...]
    events: tuple[str, ...]
    rejected_files: int = 0


def format_duration(seconds: float | None) -> str:
    if seconds is None:
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


def sparkline(values: tuple[float, ...]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(7, int((v - low) / span * 7.999))] if high > low else SPARK[0] for v in values)


def _memory(device: DeviceSnapshot | None, label: str) -> Text:
    if device is None:
        return Text(f"GPU: N/A ({label})", style="dim")
    share = device.used_mib / device.total_mib if device.total_mib else 0.0
    style = "red" if share > 0.95 else "yellow" if share > 0.85 else "green"
    filled = int(round(share * 20))
    return Text.assemble(f"{device.name} ", ("█" * filled + "░" * (20 - filled), style),
                         f" {device.used_mib / 1024:.1f}/{device.total_mib / 1024:.1f} GiB")


def render(view: SwarmView) -> Group:
    rate = "-" if view.rounds_per_hour is None else f"{view.rounds_per_hour:.0f} rounds/h"
    header = Text.assemble(("rl-swarm ", "bold"), f"{view.experiment} · {view.model} · ",
                           ("round ", "bold"), f"{view.round}/{view.max_rounds} · elapsed ",
                           format_duration(view.elapsed_s), f" · {rate} · ETA {format_duration(view.eta_s)} · ",
                           f"rejected files {view.rejected_files}")
    table = Table(expand=False, show_edge=False, pad_edge=False)
    for column in ("node", "role", "status", "round", "reward", "trend", "acc", "loc+ext", "GPU MiB", "RAM MiB",
                   "restarts", "beat"):
        table.add_column(column, justify="left" if column in ("node", "role", "status", "trend") else "right")
    for row in view.nodes:
        status = Text(row.status, style=STATUS_STYLE.get(row.status, ""))
        if row.last_error:
            status.append(f" {row.last_error[:60]}", style="red")
        rollouts = "-" if row.local_rollouts is None else f"{row.local_rollouts}+{row.external_rollouts or 0}"
        table.add_row(row.node_id, row.role, status, "-" if row.round is None else str(row.round),
                      _num(row.reward, ".3f"), sparkline(row.reward_trend),
                      "N/A" if row.accuracy is None else f"{row.accuracy:.0%}", rollouts,
                      _num(row.gpu_mib, ".0f"), _num(row.ram_mib, ".0f"), str(row.restarts),
                      "-" if row.heartbeat_age_s is None else format_duration(row.heartbeat_age_s))
    parts = [header, _memory(view.device, view.device_label), table]
    if view.events:
        parts.append(Text("\n".join(view.events[-5:]), style="dim"))
    return Group(*parts)


def status_line(view: SwarmView) -> str:
    workers = [n for n in view.nodes if n.role == "worker"]
    running = sum(n.status not in ("failed", "crashed", "stopped", "done", "restarting") for n in workers)
    rewards = [n.reward for n in workers if n.reward is not None]
    accs = [n.accuracy for n in workers if n.accuracy is not None]
    reward = f"reward {sum(rewards) / len(rewards):.3f}" if rewards else "reward -"
    acc = f"acc {sum(accs) / len(accs):.1%}" if accs else "acc -"
    speed = "-" if not view.rounds_per_hour else f"{3600 / view.rounds_per_hour:.1f} s/round"
    gpu = "GPU N/A" if view.device is None else \
        f"GPU {view.device.used_mib / 1024:.1f}/{view.device.total_mib / 1024:.1f} GiB"
    failed = [n.node_id for n in workers if n.status in ("failed", "restarting", "crashed")]
    trouble = f" | {', '.join(failed)}: {'/'.join(sorted({n.status for n in workers if n.node_id in failed}))}" \
        if failed else ""
    return (f"[rl-swarm] exp={view.experiment} round {view.round}/{view.max_rounds} | {running}/{len(workers)} "
            f"workers running | {reward} {acc} | {speed}, ETA {format_duration(view.eta_s)} | {gpu}{trouble}")


class Dashboard:
    """A live table in a terminal; in a pipe, CI log or notebook, a status line when something changes."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4, line_interval_s: float = 30.0):
        self.console = console or Console()
        self.min_gap = 1.0 / refresh_per_second
        self.line_interval_s = line_interval_s
        self._live: Live | None = None
        self._last_draw = 0.0
        self._last_key: tuple | None = None
        self._last_line = 0.0
        self._view: SwarmView | None = None

    def start(self) -> None:
        if self.console.is_terminal and self._live is None:
            self._live = Live(console=self.console, auto_refresh=False, transient=False, redirect_stdout=False,
                              redirect_stderr=False)
            self._live.start()

    def update(self, view: SwarmView) -> None:
        self._view = view
        now = time.monotonic()
        if self._live is not None:
            if now - self._last_draw >= self.min_gap:
                self._live.update(render(view), refresh=True)
                self._last_draw = now
            return
        key = (view.round, tuple((n.node_id, n.status) for n in view.nodes
                                 if n.status in ("failed", "restarting", "crashed")))
        if key != self._last_key or now - self._last_line >= self.line_interval_s:
            self.console.print(status_line(view), markup=False, highlight=False, soft_wrap=True)
            self._last_key, self._last_line = key, now

    def stop(self) -> None:
        if self._live is not None:
            if self._view is not None:
                self._live.update(render(self._view), refresh=True)
            self._live.stop()
            self._live = None
        elif self._view is not None:
            self.console.print(status_line(self._view), markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> "Dashboard":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
