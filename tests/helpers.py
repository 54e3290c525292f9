"""Helpers the tests share: a swarm's environment, running `rl-swarm up`, reading its files, drawing a frame,
a peer's group."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from rich.console import Console

from workers.learning.tasks import Question
from workers.shared_folder.protocol import RolloutGroup


def swarm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUM_", "MAX_", "ROLLOUT_", "PRESET"))}
    env.update({"GDRIVE_PATH": str(tmp_path / "drive"), "EXPERIMENT_NAME": "e2e", "TEST_MODE": "True",
                "MODEL_NAME": "rl-swarm/tiny-gpt2", "RL_SWARM_CACHE": str(tmp_path / "cache"),
                "HF_HUB_OFFLINE": "1", "DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_up(env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=env, capture_output=True,
                          text=True, timeout=timeout)


def survivors(pids: list[int], grace_s: float) -> list[str]:
    """Processes still running after a grace period (multiprocessing's helper exits when it sees EOF)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(proc.cmdline())[:200])
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def metrics_rows(exp: Path, node: str) -> list[dict]:
    path = exp / "metrics" / node / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def console_text(renderable: object, width: int = 160) -> str:
    """What a terminal of `width` columns shows, without colours."""
    console = Console(record=True, width=width, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def peer_group(question: Question, answers: list[str], claimed: float = 1.0, **fields: object) -> RolloutGroup:
    """A peer's group naming `question`, one finished completion ending in each answer; `fields` forge the rest."""
    return RolloutGroup(**{"task": question.task, "dataset_seed": question.dataset_seed, "index": question.index,
                           "completions": tuple(f" <answer>{a}</answer>" for a in answers),
                           "finished": (True,) * len(answers), "rewards": (claimed,) * len(answers), **fields})
