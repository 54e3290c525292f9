"""On the GPU machine: the swarm runs on cuda:0 and the supervisor sees every worker's GPU memory."""

import json
import subprocess
import sys

import pytest

from tests.helpers import swarm_env

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_swarm_on_cuda_reports_per_worker_gpu_memory(tmp_path):
    env = swarm_env(tmp_path, NUM_WORKERS="2", DEVICE="auto", MAX_ROUNDS="4")
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    exp = tmp_path / "drive" / "experiments" / "e2e"
    assert json.loads((exp / "config.json").read_text())["device_resolved"] == "cuda:0"
    rows = [json.loads(line) for line in (exp / "logs" / "supervisor" / "monitor.jsonl").read_text().splitlines()]
    seen = {node for row in rows for node, values in row["nodes"].items() if values["gpu_mib"]}
    assert seen == {"worker-1", "worker-2"}
    # the pre-start RAM warning's estimate is not below what a CUDA worker held of the host's RAM (its PSS)
    from transformers import AutoConfig

    from workers.learning.memory import estimate_worker_host_mib
    from workers.learning.model import model_source

    held = max(values["pss_mib"] or 0 for row in rows for values in row["nodes"].values())
    config = AutoConfig.from_pretrained(model_source(env["MODEL_NAME"], env["RL_SWARM_CACHE"]))
    assert 0 < held <= estimate_worker_host_mib(config, on_cuda=True), held
