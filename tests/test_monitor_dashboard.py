"""The dashboard shows a row per node; on a machine without GPU every GPU value is N/A, never an error."""

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from swarm_supervisor.dashboard import Dashboard, format_duration, render, sparkline, status_line
from swarm_supervisor.status import NodeRow, SwarmView
from swarm_supervisor.monitor import DeviceSnapshot, Monitor, MonitorSnapshot, PeakWindow, ProcessSnapshot
from tests.helpers import append_as, node_exchange, viewer


def row(node: str, status: str = "training", **extra) -> NodeRow:
    values = dict(node_id=node, role="worker", status=status, round=3, reward=0.3125, accuracy=0.25,
                  reward_trend=(0.1, 0.2, 0.3), local_rollouts=2, external_rollouts=2, gpu_mib=None,
                  ram_mib=812.0, restarts=0, heartbeat_age_s=3.2, last_error=None)
    values.update(extra)
    return NodeRow(**values)


def view(nodes, round_=3, **extra) -> SwarmView:
    values = dict(experiment="exp", model="rl-swarm/tiny-gpt2", device_label="cpu", round=round_, max_rounds=10,
                  elapsed_s=125, rounds_per_hour=120.0, eta_s=210, devices=(), nodes=tuple(nodes),
                  events=("12:00:00 worker-3: failed (3 restarts within 600s): CUDA out of memory",))
    values.update(extra)
    return SwarmView(**values)


def frame(swarm: SwarmView) -> str:
    console = Console(record=True, width=160, force_terminal=False)
    console.print(render(swarm))
    return console.export_text()


def test_monitor_on_a_cpu_machine_reports_ram_and_na_for_gpu():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    monitor = Monitor()
    try:
        first = monitor.sample([os.getpid(), dead.pid])
        again = monitor.sample([os.getpid(), dead.pid])     # the cached psutil.Process is reused
        on_gpu = monitor.gpu_available()
    finally:
        monitor.close()
    me = again.processes[os.getpid()]
    assert me.alive and me.rss_mib > 10 and me.cpu_pct is not None
    if sys.platform == "linux":     # a share of the pages counted in RSS: never more than RSS
        assert 0 < me.pss_mib <= me.rss_mib
    assert first.processes[dead.pid] == again.processes[dead.pid]
    assert not again.processes[dead.pid].alive and again.processes[dead.pid].rss_mib is None
    assert again.host_ram_total_mib > again.host_ram_used_mib > 0
    if not on_gpu:
        assert again.devices == () and me.gpu_mib is None
    assert not monitor.gpu_available()      # closed


@pytest.mark.skipif(sys.platform != "linux", reason="PSS is Linux's")
def test_pss_is_read_once_per_interval_and_the_readings_are_spread_over_the_samples(monkeypatch):
    """Reading a CUDA worker's PSS walks its page tables (11 ms on the H200's host): 32 workers read at every 1 s
    sample would cost the supervisor a third of a core, and all read in one sample would stall it."""
    from swarm_supervisor import monitor as monitor_module
    reads = []
    real = monitor_module._pss_mib
    monkeypatch.setattr(monitor_module, "_pss_mib", lambda proc: reads.append(proc.pid) or real(proc))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monitor = Monitor(gpus={}, pss_every_s=2.0)       # two processes: one reading a sample
    try:
        pids = [os.getpid(), other.pid]
        samples = [monitor.sample(pids) for _ in range(3)]
    finally:
        monitor.close()
        other.kill()
        other.wait(timeout=30)
    assert sorted(reads) == sorted(pids)                 # each once in three samples, one per sample
    assert sum(p.pss_mib is not None for p in samples[0].processes.values()) == 1     # the other's turn is next
    assert all(0 < p.pss_mib <= p.rss_mib for p in samples[2].processes.values())   # a share of RSS, kept


def test_a_recorded_frame_has_a_row_per_node_with_the_failed_nodes_error():
    text = frame(view([row("worker-1"), row("worker-2", status="waiting"),
                       row("worker-3", status="failed", last_error="CUDA out of memory")]))
    lines = text.splitlines()
    for node, status in (("worker-1", "training"), ("worker-2", "waiting"), ("worker-3", "failed")):
        [line] = [line for line in lines if node in line and "restarts" not in line and ":" not in line]
        assert status in line and "0.312" in line and "25%" in line and "2+2" in line and "812" in line
        assert "N/A" in line and "3s" in line and "▁▅█" in line
    assert "failed CUDA out of memory" in text
    assert "GPU: N/A (cpu)" in text and "round 3/10" in text and "ETA 3m30s" in text
    assert "CUDA out of memory" in lines[-1]     # the newest event closes the frame


def test_a_view_of_nothing_but_unknowns_renders():
    empty = row("worker-1", status="starting", round=None, reward=None, accuracy=None, reward_trend=(),
                local_rollouts=None, external_rollouts=None, ram_mib=None, heartbeat_age_s=None,
                last_error=None)
    swarm = view([empty], round_=0, rounds_per_hour=None, eta_s=None, events=())
    assert "worker-1" in frame(swarm)
    assert "reward - acc -" in status_line(swarm) and "ETA -" in status_line(swarm)
    assert "worker-1" in frame(view([row("worker-1", reward=float("nan"), reward_trend=(float("nan"), 0.2))]))


def test_the_memory_bar_turns_red_near_full_and_shows_mib():
    full = DeviceSnapshot(name="NVIDIA H100", total_mib=81559, used_mib=79000, free_mib=2559, utilization_pct=None)
    console = Console(record=True, width=160, force_terminal=True, color_system="truecolor")
    console.print(render(view([row("worker-1", gpu_mib=6512.0)], devices=(full,), device_label="cuda:0")))
    text = console.export_text(clear=False)
    assert "cuda:0 NVIDIA H100" in text and "79,000/81,559 MiB (97%)" in text and "6,512" in text
    assert "\x1b[31m 79,000/81,559 MiB" in console.export_text(styles=True)     # red
    assert "GPU 77.1/79.6 GiB" in status_line(view([row("worker-1")], devices=(full,)))


def test_status_line_summarises_the_swarm():
    line = status_line(view([row("worker-1"), row("worker-2", status="failed", last_error="x")], rejected_files=2))
    assert line.startswith("[rl-swarm] exp=exp round 3/10 | 1/2 workers running | reward 0.312 acc 25.0%")
    assert "30.0 s/round, ETA 3m30s | GPU N/A" in line and "worker-2: failed" in line
    assert "rejected files 2" in line and "\n" not in line


def test_status_line_counts_a_worker_still_loading_its_model_as_starting_not_running():
    loading = row("worker-4", status="starting", round=None, reward=None, accuracy=None)
    line = status_line(view([row("worker-1"), row("worker-2", status="waiting"), row("worker-3"), loading]))
    assert " | 3/4 workers running, 1 starting | reward 0.312 " in line
    all_loading = [row(f"worker-{i}", status="starting", round=None) for i in (1, 2)]
    assert " | 0/2 workers running, 2 starting | " in status_line(view(all_loading, round_=0))


def test_in_a_pipe_the_dashboard_prints_a_line_when_something_changes_not_a_table():
    out = io.StringIO()
    with Dashboard(Console(file=out, force_terminal=False, width=80), line_interval_s=3600) as dashboard:
        dashboard.update(view([row("worker-1"), row("worker-2")], round_=1))
        dashboard.update(view([row("worker-1"), row("worker-2")], round_=1))
        dashboard.update(view([row("worker-1"), row("worker-2")], round_=2))
        dashboard.update(view([row("worker-1"), row("worker-2", status="restarting")], round_=2))
        dashboard.update(view([row("worker-1"), row("worker-2", status="restarting")], round_=2))
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["[rl-swarm] exp=exp round 1/10"] + \
        ["[rl-swarm] exp=exp round 2/10"] * 2      # round 2 and the restart; the stop's line said nothing new
    assert "worker-2: restarting" in lines[2]
    assert "┃" not in out.getvalue() and "│" not in out.getvalue()


def test_a_run_ends_in_a_pipe_with_its_final_line_printed_once():
    out = io.StringIO()
    with Dashboard(Console(file=out, force_terminal=False, width=80), line_interval_s=3600) as dashboard:
        dashboard.update(view([row("worker-1", status="done")], round_=10, phase="finished"))
        dashboard.update(view([row("worker-1", status="done")], round_=10, phase="finished"))   # the supervisor's last
    assert out.getvalue().count("round 10/10") == 1
    out = io.StringIO()
    with Dashboard(Console(file=out, force_terminal=False, width=80), line_interval_s=3600) as dashboard:
        dashboard.update(view([row("worker-1")], round_=4))
        dashboard.update(view([row("worker-1", status="stopped")], round_=4, phase="stopped"))
    assert [line.rsplit(" | ", 2)[1] for line in out.getvalue().splitlines()] == \
        ["30.0 s/round, ETA 3m30s", "30.0 s/round, stopped"]        # what changed since the last line is printed


def test_in_a_terminal_the_last_frame_stays_on_screen():
    out = io.StringIO()
    dashboard = Dashboard(Console(file=out, force_terminal=True, width=160), refresh_per_second=1000)
    dashboard.start()
    dashboard.update(view([row("worker-1")], round_=1))
    dashboard.update(view([row("worker-1", status="done")], round_=10))
    dashboard.stop()
    last_frame = out.getvalue().rsplit("rl-swarm", 1)[1]
    assert "10/10" in last_frame and "done" in last_frame
    assert "[rl-swarm]" not in out.getvalue()


def test_a_terminal_that_hung_up_ends_the_drawing_not_the_swarm(caplog):
    """A hung-up terminal fails writes with EIO, often before its SIGHUP: the supervisor's loop must go on."""
    class HungUp(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(5, "Input/output error")

    dashboard = Dashboard(Console(file=HungUp(), force_terminal=True, width=160), refresh_per_second=1000)
    dashboard.update(view([row("worker-1")], round_=1))           # raised out of the supervisor's loop before
    dashboard.update(view([row("worker-1")], round_=2))
    dashboard.stop()
    assert not dashboard.shown and caplog.text.count("its terminal is gone") == 1


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (12, "12s"), (185, "3m05s"), (75840, "21h04m"),
                                           (-5, "0s"), (None, "-"), (float("inf"), "-")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_a_reward_trend_is_a_sparkline_from_lowest_to_highest():
    assert sparkline((0.0, 0.5, 1.0)) == "▁▅█"
    assert sparkline((0.3, 0.3)) == "▁▁" and sparkline(()) == ""


@pytest.mark.gpu
def sample(at: float, used: float, **processes: tuple[float | None, float | None] | None) -> MonitorSnapshot:
    """A monitor reading: the GPU's used MiB, and per pid (p7=...) its (GPU MiB, RSS MiB), or None once exited."""
    procs = {int(pid[1:]): ProcessSnapshot(int(pid[1:]), alive=v is not None, rss_mib=v and v[1], cpu_pct=5.0,
                                           gpu_mib=v and v[0]) for pid, v in processes.items()}
    device = DeviceSnapshot("H200", total_mib=80000, used_mib=used, free_mib=80000 - used, utilization_pct=None)
    return MonitorSnapshot(at, (device,), procs, supervisor_cpu_pct=1.0, host_ram_used_mib=1, host_ram_total_mib=2)


def test_a_record_keeps_the_peak_of_a_checkpoint_between_two_records_and_workers_that_exited_or_restarted():
    window = PeakWindow()
    assert window.take() is None                        # nothing sampled: nothing to record
    nodes = {7: "worker-1", 8: "worker-2", 9: "worker-1"}   # worker-1 restarts as pid 9
    window.add(sample(1.0, 5000, p7=(2000, 900), p8=(None, 800)), nodes)
    window.add(sample(2.0, 6500, p7=(3100, 1900), p8=(2100, 850)), nodes)    # worker-1's out-of-memory peak
    window.add(sample(3.0, 5100, p7=None, p8=None, p9=(1500, 700)), nodes)   # it restarted; worker-2 exited
    record, by_node = window.take()
    assert record.taken_at == 3.0 and record.devices[0].used_mib == 6500
    assert (by_node["worker-1"].gpu_mib, by_node["worker-1"].rss_mib) == (3100, 1900)
    assert (by_node["worker-2"].gpu_mib, by_node["worker-2"].rss_mib) == (2100, 850)
    window.add(sample(4.0, 5000, p9=(2000, 900)), nodes)      # the next window starts afresh
    assert window.take()[1]["worker-1"].gpu_mib == 2000


def test_nvml_reports_the_device_and_this_processs_gpu_memory():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.zeros(1024, 1024, device="cuda")
    monitor = Monitor()
    try:
        if not monitor.gpu_available():
            pytest.skip("NVML cannot be initialised here")
        snap = monitor.sample([os.getpid()])
    finally:
        monitor.close()
    [device] = snap.devices
    assert device.label == "cuda:0" and device.total_mib > 1000 and device.used_mib > 0
    assert snap.processes[os.getpid()].gpu_mib is None or snap.processes[os.getpid()].gpu_mib > 0


def test_the_dashboard_shows_each_workers_held_out_accuracy_from_start_to_newest(tmp_path):
    import time

    from swarm_supervisor.status import SwarmReader
    from workers.shared_folder.held_out import eval_file
    from workers.shared_folder.folder import ExperimentFolder
    from workers.shared_folder.jsonl import append_jsonl
    from workers.shared_folder.protocol import Heartbeat, HeldOutEval

    folder = ExperimentFolder(tmp_path).create()
    for node in ("worker-1", "worker-2"):
        now = time.time()
        node_exchange(folder, node).write_heartbeat(Heartbeat(node=node, role="worker", pid=1, host="h", instance="i",
                                                         status="training", round=50, started_at=now,
                                                         updated_at=now))
    for round_, accuracy in ((0, 0.12), (50, 0.42)):
        append_as(folder, "worker-1", eval_file(folder, "worker-1"),
                  HeldOutEval("worker-1", round_, accuracy, 100, 3.0).to_json())
    append_as(folder, "worker-2", eval_file(folder, "worker-2"), HeldOutEval("worker-2", 0, 0.1, 100, 3.0).to_json())
    reader = SwarmReader(folder, viewer(folder), "rl-swarm/tiny-gpt2", "cpu")

    def line_of(text: str, node: str) -> str:
        [line] = [line for line in text.splitlines() if node in line]
        return line

    text = frame(reader.view())
    assert "held-out" in text
    assert "12→42%" in line_of(text, "worker-1") and " 10% " in line_of(text, "worker-2")   # only the start so far
    append_as(folder, "worker-2", eval_file(folder, "worker-2"), HeldOutEval("worker-2", 50, 0.3, 100, 3.0).to_json())
    swarm = reader.view()
    assert "10→30%" in line_of(frame(swarm), "worker-2")
    assert "held-out 36.0%" in status_line(swarm)                 # the mean of the newest: (42% + 30%) / 2

    # what only the supervisor measures comes from the files it records it in: a folder reader shows it too
    append_jsonl(folder.monitor_file, {"time": time.time(), "nodes": {"worker-1": {"gpu_mib": 2560.0, "rss_mib": 1234.0,
                                                                               "cpu_pct": 50.0}},
                                       "device_used_mib": 20480.0, "device_total_mib": 40960.0})
    append_jsonl(folder.events_file, {"time": time.time(), "event": "worker-2: restarting", "level": "info",
                                      "kind": "restart", "node": "worker-2"})
    text = frame(reader.view())
    assert "2,560" in line_of(text, "worker-1") and "1,234" in line_of(text, "worker-1")
    assert "20,480/40,960 MiB (50%)" in text
    assert line_of(text, "worker-2").split("│")[-2].strip() == "1"     # restarts, before the beat's age


def test_late_and_gone_workers_and_a_folder_in_trouble_are_shown_where_the_eye_looks():
    nodes = [row("w-ok"), row("w-late", heartbeat_age_s=45.0, liveness="late"),
             row("w-gone", heartbeat_age_s=130.0, liveness="gone"),
             row("w-note", note="round 7: rollouts not published (Input/output error); trained on local rollouts"),
             row("w-done", status="done", heartbeat_age_s=300.0, liveness="gone")]
    text = frame(view(nodes))

    def line_of(node: str) -> str:
        [line] = [line for line in text.splitlines() if node in line]
        return line

    assert line_of("w-late").rstrip().endswith("45s late")
    assert line_of("w-gone").rstrip().endswith("2m10s gone")
    assert "round 7: rollouts not published" in line_of("w-note")
    assert line_of("w-done").rstrip().endswith("5m00s")               # finished: its silence is no news
    line = status_line(view(nodes))
    assert "w-late: late" in line and "w-gone: gone" in line and "w-done" not in line
    assert "w-note: round 7: rollouts not published" in line
