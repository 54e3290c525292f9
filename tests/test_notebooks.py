"""Every notebook runs top to bottom on CPU with the tiny model; a stand-in makes the Drive mount a no-op."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


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


def execute(name: str, cwd: Path) -> float:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "outputs not stripped"
    started = time.monotonic()
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()   # raises on any cell error
    seconds = time.monotonic() - started
    print(f"{name}.ipynb ran in {seconds:.0f}s")
    return seconds


def test_colab_swarm_runs_and_a_rerun_resumes_then_monitor_shows_it(colab_env, start_from_base):
    exp = colab_env / "drive" / "experiments" / "sapo-gpt2"
    start_from_base(exp)
    execute("colab_swarm", colab_env)
    assert (exp / "state" / "finished.json").exists()
    execute("colab_swarm", colab_env)         # re-run after "a disconnect": already finished, nothing redone
    assert len((exp / "metrics" / "worker-1" / "metrics.jsonl").read_text().splitlines()) == 3
    execute("monitor", colab_env)
    assert (colab_env / "drive" / "plots" / "sapo-gpt2.png").exists()


def test_join_worker_adds_workers_to_a_running_swarm(colab_env, monkeypatch, start_from_base):
    exp = colab_env / "drive" / "experiments" / "sapo-gpt2"
    start_from_base(exp)
    up = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env={**dict(__import__("os").environ), "MAX_ROUNDS": "60",
                                                          "NUM_TRAIN_SAMPLES": "1", "NUM_TRANSPLANT_TREES": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (exp / "state" / "round_000001.json").exists():
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        monkeypatch.setenv("NUM_WORKERS", "1")
        monkeypatch.setenv("MAX_ROUNDS", "60")
        monkeypatch.setenv("NUM_TRAIN_SAMPLES", "1")
        monkeypatch.setenv("NUM_TRANSPLANT_TREES", "1")
        execute("join_worker", colab_env)
        assert up.wait(timeout=120) == 0
    finally:
        up.kill()
    rows = [json.loads(line) for line in (exp / "metrics" / "colab2" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["round"] == 60


def test_sapo_configs_runs_the_four_configurations_and_compares_them(colab_env, monkeypatch, start_from_base):
    monkeypatch.setenv("NUM_WORKERS", "4")        # 1/3 needs three peers publishing one group each
    presets = ("sapo-4-0", "sapo-3-1", "sapo-2-2", "sapo-1-3")
    for preset in presets:
        start_from_base(colab_env / "drive" / "experiments" / f"{preset}-test")
    execute("sapo_configs", colab_env)
    for preset in presets:
        assert (colab_env / "drive" / "experiments" / f"{preset}-test" / "state" / "finished.json").exists()
    assert (colab_env / "drive" / "plots" / "sapo-configs.png").exists()
