"""Workers on every GPU of the host, checked on this CPU machine with a stand-in list of GPUs."""

import os
import time

import pytest

from configs_env import SwarmConfig, SwarmError
from swarm_supervisor import cli, preflight
from swarm_supervisor.dashboard import render, status_line
from swarm_supervisor.devices import nvml_ids, worker_devices
from swarm_supervisor.monitor import Monitor
from swarm_supervisor.status import SwarmReader
from tests.helpers import StandInNVML, console_text, node_exchange
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import Heartbeat

GIB = 1024.0
NEED_MIB = 2.8 * GIB        # about one default GPT-2 worker


def test_auto_spreads_the_workers_round_robin_over_every_gpu_and_a_pin_keeps_one():
    assert worker_devices("auto", 5, gpus=2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("auto", 2, gpus=4) == ["cuda:0", "cuda:1"]
    assert worker_devices("cuda:1", 3, gpus=2) == ["cuda:1"] * 3
    assert worker_devices("cuda", 2, gpus=2) == ["cuda:0"] * 2
    devices, note = preflight.resolve_devices(SwarmConfig.from_env({"NUM_WORKERS": "3"}), gpus=0)
    assert devices == ["cpu"] * 3 and note == "CUDA is not available: the workers run on the CPU"


@pytest.mark.parametrize("device, gpus, expected", [
    ("cuda:2", 2, "DEVICE=cuda:2: this machine has 2 GPUs (cuda:0 to cuda:1); pin one of them (e.g. DEVICE=cuda:1) "
                  "or set DEVICE=auto to spread the workers over all of them"),
    ("cuda:1", 0, "DEVICE=cuda:1: CUDA is not available on this machine; use DEVICE=cpu or DEVICE=auto"),
    ("gpu1", 2, "DEVICE='gpu1': expected auto, cpu, cuda or cuda:N (e.g. DEVICE=cuda:0)")])
def test_a_device_this_host_cannot_honour_is_one_line(monkeypatch, capsys, tmp_path, device, gpus, expected):
    monkeypatch.setenv("DEVICE", device)
    monkeypatch.setenv("GDRIVE_PATH", str(tmp_path))
    monkeypatch.setattr(cli, "gpu_count", lambda: gpus)
    assert cli.main(["up"]) == 2
    assert capsys.readouterr().err == f"rl-swarm: error: {expected}\n"
    assert not (tmp_path / "experiments").exists()     # refused before anything was started or written


def test_the_fit_check_reads_each_gpu_and_names_the_one_that_is_short(capsys):
    # cuda:0 is free; another job holds most of cuda:1
    gpus = [(80 * GIB, 2 * GIB, {}), (80 * GIB, 73 * GIB, {})]
    six = SwarmConfig.from_env({"NUM_WORKERS": "6"})
    with pytest.raises(SwarmError) as refused:
        preflight.check_fit(six, 2, NEED_MIB, Monitor(nvml_ids(["cuda:0", "cuda:1"], None), nvml=StandInNVML(gpus)))
    assert capsys.readouterr().out.splitlines() == [
        "rl-swarm: cuda:0: 3 workers, ~2.8 GiB each, 78.0 GiB free: room for 26",
        "rl-swarm: cuda:1: 3 workers, ~2.8 GiB each, 7.0 GiB free: room for 2"]
    assert str(refused.value) == ("NUM_WORKERS=6 puts 3 workers on cuda:1, needing ~8 GiB, but it has 7 GiB free: at "
                                  "most 2 fit there (set NUM_WORKERS=5, or lower MAX_NEW_TOKENS / NUM_GENERATIONS)")
    five = SwarmConfig.from_env({"NUM_WORKERS": "5"})
    preflight.check_fit(five, 2, NEED_MIB, Monitor(nvml_ids(["cuda:0", "cuda:1"], None), nvml=StandInNVML(gpus)))
    assert "cuda:1: 2 workers" in capsys.readouterr().out
    # CUDA_VISIBLE_DEVICES=1,0: the workers' cuda:0 is the busy GPU, and the check reads that one as cuda:0
    swapped = SwarmConfig.from_env({"NUM_WORKERS": "6", "CUDA_VISIBLE_DEVICES": "1,0"})
    with pytest.raises(SwarmError, match="puts 3 workers on cuda:0"):
        preflight.check_fit(swapped, 2, NEED_MIB,
                            Monitor(nvml_ids(["cuda:0", "cuda:1"], "1,0"), nvml=StandInNVML(gpus)))


def test_update_graphs_auto_runs_eagerly_where_the_gpu_has_no_room_for_them_and_on_refuses(capsys):
    """The update's CUDA graphs cost memory: auto keeps them where every GPU has room, else says so and runs the
    update eagerly; on insists, and a swarm that does not fit with them is refused."""
    def need_of(settings: SwarmConfig) -> float:
        return NEED_MIB + (0.8 * GIB if settings.graphed_update else 0.0)

    def settle(env: dict, free_gib: float):
        gpu = Monitor(nvml_ids(["cuda:0"], None), nvml=StandInNVML([(80 * GIB, (80 - free_gib) * GIB, {})]))
        return preflight.settle_fit(SwarmConfig.from_env({"NUM_WORKERS": "8", **env}), 1, need_of, gpu)

    settings, need = settle({}, free_gib=40)                       # 8 x 3.6 GiB fit in 40 GiB below the high-water mark
    assert settings.update_graphs == "auto" and need == NEED_MIB + 0.8 * GIB
    capsys.readouterr()
    settings, need = settle({}, free_gib=27)                       # 8 x 2.8 do, 8 x 3.6 do not
    assert settings.update_graphs == "off" and not settings.graphed_update and need == NEED_MIB
    assert capsys.readouterr().out.splitlines() == [
        "rl-swarm: UPDATE_GRAPHS=auto: with the update's CUDA graphs a worker needs ~3.6 GiB and cuda:0 has room for "
        "7 of its 8; the update runs eagerly (~2.8 GiB a worker)",
        "rl-swarm: cuda:0: 8 workers, ~2.8 GiB each, 27.0 GiB free: room for 9"]
    with pytest.raises(SwarmError, match="at most 7 fit there"):
        settle({"UPDATE_GRAPHS": "on"}, free_gib=27)
    with pytest.raises(SwarmError, match="at most 6 fit there"):     # fits neither way: refused as before
        settle({}, free_gib=20)


def test_the_dashboard_shows_each_gpu_and_each_workers_device(tmp_path):
    me = os.getpid()
    gpus = [(80 * GIB, 10 * GIB, {}), (80 * GIB, 40 * GIB, {me: 3000.0}), (80 * GIB, 0.0, {})]
    monitor = Monitor(nvml_ids(["cuda:0", "cuda:1"], "GPU-0,GPU-1,GPU-2"), nvml=StandInNVML(gpus))
    snapshot = monitor.sample([me])
    monitor.close()
    assert [d.label for d in snapshot.devices] == ["cuda:0", "cuda:1"] and snapshot.processes[me].gpu_mib == 3000.0
    # `rl-swarm status` on another machine: each worker's device comes from its heartbeat
    folder = ExperimentFolder(tmp_path).create()
    for node, device in (("worker-1", "cuda:0"), ("worker-2", "cuda:1")):
        now = time.time()
        node_exchange(folder, node).write_heartbeat(Heartbeat(node=node, role="worker", pid=1, host="h", instance="i",
                                                         status="training", round=2, started_at=now,
                                                         updated_at=now, device=device))
    viewer = SwarmConfig(cache_dir=tmp_path / "cache")
    view = SwarmReader(folder, viewer, "gpt2", "cuda:0, cuda:1").view(snapshot=snapshot)
    text = console_text(render(view))
    assert "cuda:0 NVIDIA H100" in text and "10,240/81,920 MiB (12%)" in text
    assert "cuda:1 NVIDIA H100" in text and "40,960/81,920 MiB (50%)" in text
    rows = {node: line for line in text.splitlines() for node in ("worker-1", "worker-2") if node in line}
    assert "cuda:0" in rows["worker-1"] and "cuda:1" in rows["worker-2"]
    assert "GPU cuda:0 10.0/80.0 GiB, cuda:1 40.0/80.0 GiB" in status_line(view)
