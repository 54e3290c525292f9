"""Every notebook runs top to bottom on CPU with the tiny model; a stand-in makes the Drive mount a no-op."""

import asyncio
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.helpers import metrics_rows, survivors

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
from tests.notebook_runs import NOTEBOOKS, execute, outputs_text  # noqa: E402 - after the skips above

pytestmark = pytest.mark.slow
REPO = Path(__file__).parent.parent


@pytest.fixture
def colab_env(tmp_path, monkeypatch):
    """Environment of a CPU 'runtime': a google.colab whose drive.mount does nothing, the tiny model, TEST_MODE."""
    fake = tmp_path / "fake-colab"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "colab" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "drive.py").write_text(
        "MOUNTED = []\n\ndef mount(path, **kwargs):\n    MOUNTED.append(path)\n")
    values = {"PYTHONPATH": f"{fake}:{Path(__file__).parent.parent}", "GDRIVE_PATH": str(tmp_path / "drive"),
              "MODEL_NAME": "rl-swarm/tiny-gpt2", "HF_HUB_OFFLINE": "1",
              "DEVICE": "cpu", "TEST_MODE": "true", "NUM_WORKERS": "2"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def fresh_runtime(tmp_path: Path, monkeypatch) -> str:
    """A kernel whose Python has every dependency but not rl-swarm, as a new Colab runtime: its name."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake-colab"))      # rl-swarm only as the cell installs it
    venv = tmp_path / "runtime"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # this environment's packages as plain folders: the .pth files there (an editable rl-swarm) are not read
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if subprocess.run([str(python), "-c", "import swarm_supervisor"], cwd=tmp_path, capture_output=True,
                      timeout=60).returncode == 0:
        pytest.skip("rl-swarm is installed into this environment (not editable): no runtime without it to test")
    spec = tmp_path / "jupyter" / "kernels" / "fresh-runtime"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [str(python), "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"],
                                                  "display_name": "fresh runtime", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")                              # the wheel has all it needs here
    return "fresh-runtime"


async def execute_then_interrupt(notebook, cwd: Path, kernel: str, ready) -> float:
    """Run the notebook's cell and interrupt the kernel, as the stop button does, once `ready()`; seconds the cell
    took from the interrupt to its end."""
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name=kernel,
                                     resources={"metadata": {"path": str(cwd)}})
    async with client.async_setup_kernel():
        cell = asyncio.ensure_future(client.async_execute_cell(notebook.cells[0], 0))
        deadline = time.monotonic() + 500
        while not ready():
            assert not cell.done(), f"the cell ended before the interrupt: {outputs_text(notebook)[-2000:]}"
            assert time.monotonic() < deadline, "the swarm did not reach the interrupt point"
            await asyncio.sleep(0.2)
        interrupted = time.monotonic()
        await client.km.interrupt_kernel()
        await asyncio.wait_for(cell, 120)
        return time.monotonic() - interrupted


def test_colab_cell_installs_from_drive_draws_the_table_stops_on_interrupt_and_resumes(colab_env, monkeypatch,
                                                                                      start_from_base):
    """A new runtime: the cell installs the wheel `rl-swarm pack` put in the Drive folder, draws the table, the stop
    button stops the swarm with no process left, running the cell again finishes it, and monitor shows it."""
    drive = colab_env / "drive"
    kernel = fresh_runtime(colab_env, monkeypatch)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as nothing:     # no PACKAGE, nothing in dist/ yet
        execute("colab_swarm", colab_env, kernel)
    assert "rl-swarm: nothing to install" in str(nothing.value) and "Traceback" not in str(nothing.value)
    packed = subprocess.run([sys.executable, "-m", "swarm_supervisor", "pack"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert packed.returncode == 0 and list((drive / "dist").glob("rl_swarm-*.whl")), packed.stdout + packed.stderr
    monkeypatch.setenv("MAX_ROUNDS", "12")
    exp = drive / "experiments" / "sapo-gpt2"
    start_from_base(exp)
    metrics = exp / "metrics" / "worker-1" / "metrics.jsonl"

    notebook = nbformat.read(NOTEBOOKS / "colab_swarm.ipynb", as_version=4)
    stop_s = asyncio.run(execute_then_interrupt(
        notebook, colab_env, kernel, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2))
    print(f"the interrupted cell ended {stop_s:.1f}s after the interrupt")
    shown = outputs_text(notebook)
    assert "rl-swarm: installed from " in shown and ".whl" in shown, shown[-2000:]
    assert "stopped (resumable" in shown, shown[-2000:]
    table = shown[shown.index("rl-swarm sapo-gpt2"):]            # the table's last frame, its header first
    for node in ("coordinator", "worker-1", "worker-2"):
        assert any(line.lstrip("│ ").startswith(node) for line in table.splitlines()), table
    pids = [json.loads(p.read_text())["pid"] for p in (exp / "peers").glob("*.json")]
    assert len(pids) == 3 and survivors(pids, grace_s=10) == []
    assert not (exp / "state" / "finished.json").exists()

    execute("colab_swarm", colab_env, kernel)            # a new runtime after the stop: it installs, and resumes
    assert (exp / "state" / "finished.json").exists()
    for node in ("worker-1", "worker-2"):
        assert sorted({row["round"] for row in metrics_rows(exp, node)}) == list(range(1, 13))
    shown = outputs_text(execute("monitor", colab_env, kernel))
    assert "worker-2" in shown and "12/12" in shown, shown[-2000:]
    assert (drive / "plots" / "sapo-gpt2.png").exists()


def test_join_worker_adds_workers_to_a_running_swarm(colab_env, monkeypatch, start_from_base):
    exp = colab_env / "drive" / "experiments" / "sapo-gpt2"
    start_from_base(exp)
    # the runtime that joins starts with the swarm and waits for its coordinator's key, so its start overlaps the
    # swarm's own: it plays from round 1 and 20 rounds show it (joining after round 1 it needed 60 under load)
    for name, value in (("MAX_ROUNDS", "20"), ("NUM_TRAIN_SAMPLES", "1"), ("NUM_TRANSPLANT_TREES", "1")):
        monkeypatch.setenv(name, value)
    up = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        monkeypatch.setenv("NUM_WORKERS", "1")
        execute("join_worker", colab_env)
        assert up.wait(timeout=120) == 0
    finally:
        up.kill()
    rows = [json.loads(line) for line in (exp / "metrics" / "colab2" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["round"] == 20
