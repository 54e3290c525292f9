"""The dashboard shows a row per node; on a machine without GPU every GPU value is N/A, never an error."""

import io
import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from swarm_supervisor.dashboard import Dashboard, NodeRow, SwarmView, format_duration, render, status_line
from swarm_supervisor.monitor import Monitor


def row(node: str, status: str = "training", **extra) -> NodeRow:
    values = dict(node_id=node, role="worker", status=status, round=3, stage=0, reward=0.3125, accuracy=0.25,
                  reward_trend=(0.1, 0.2, 0.3), local_rollouts=2, external_rollouts=2, gpu_mib=None,
                  ram_mib=812.0, restarts=0, heartbeat_age_s=1.0, last_error=None)
    values.update(extra)
    return NodeRow(**values)


def view(nodes, round_=3) -> SwarmView:
    return SwarmView(experiment="exp", model="rl-swarm/tiny-gpt2", device_label="cpu", round=round_, max_rounds=10,
                     elapsed_s=125, rounds_per_hour=120.0, eta_s=210, device=None, nodes=tuple(nodes),
                     events=("12:00:00 worker-3: failed (3 restarts within 600s): CUDA out of memory",))


def test_monitor_on_a_cpu_machine_reports_ram_and_na_for_gpu():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    monitor = Monitor()
    snap = monitor.sample([os.getpid(), dead.pid])
    monitor.close()
    assert snap.processes[os.getpid()].alive and snap.processes[os.getpid()].rss_mib > 10
    assert not snap.processes[dead.pid].alive and snap.processes[dead.pid].rss_mib is None
    if not torch.cuda.is_available():
        assert snap.device is None and snap.processes[os.getpid()].gpu_mib is None


def test_a_recorded_frame_has_a_row_per_node_with_the_failed_nodes_error():
    console = Console(record=True, width=200, force_terminal=False)
    console.print(render(view([row("worker-1"), row("worker-2", status="waiting"),
                               row("worker-3", status="failed", last_error="CUDA out of memory")])))
    text = console.export_text()
    for node in ("worker-1", "worker-2", "worker-3"):
        assert node in text
    assert "0.312" in text and "25%" in text and "2+2" in text and "812" in text
    assert "failed CUDA out of memory" in text
    assert "GPU: N/A (cpu)" in text and "round 3/10" in text


def test_a_view_of_nothing_but_unknowns_renders():
    empty = row("worker-1", status="starting", round=None, stage=None, reward=None, accuracy=None, reward_trend=(),
                local_rollouts=None, external_rollouts=None, ram_mib=None, heartbeat_age_s=None)
    console = Console(record=True, width=200, force_terminal=False)
    console.print(render(view([empty])))
    assert "worker-1" in console.export_text()
    assert "reward -" in status_line(view([empty]))


def test_status_line_summarises_the_swarm():
    line = status_line(view([row("worker-1"), row("worker-2", status="failed", last_error="x")]))
    assert line.startswith("[rl-swarm] exp=exp round 3/10 | 1/2 workers running | reward 0.312 acc 25.0%")
    assert "30.0 s/round" in line and "worker-2: failed" in line


def test_in_a_pipe_the_dashboard_prints_a_line_per_round_not_a_table():
    out = io.StringIO()
    dashboard = Dashboard(Console(file=out, force_terminal=False, width=200), line_interval_s=3600)
    dashboard.start()
    dashboard.update(view([row("worker-1")], round_=1))
    dashboard.update(view([row("worker-1")], round_=1))
    dashboard.update(view([row("worker-1")], round_=2))
    dashboard.stop()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["[rl-swarm] exp=exp round 1/10", "[rl-swarm] exp=exp round 2/10",
                                                        "[rl-swarm] exp=exp round 2/10"]
    assert "┃" not in out.getvalue() and "│" not in out.getvalue()


@pytest.mark.parametrize("seconds, text", [(12, "12s"), (185, "3m05s"), (75840, "21h04m"), (None, "-")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.gpu
def test_nvml_reports_this_processs_gpu_memory():
    torch.zeros(1024, 1024, device="cuda")
    monitor = Monitor()
    snap = monitor.sample([os.getpid()])
    monitor.close()
    assert snap.device is not None and snap.device.total_mib > 1000
    assert snap.processes[os.getpid()].gpu_mib is None or snap.processes[os.getpid()].gpu_mib > 0
