"""`python -m bench.drive_trial`: the whole swarm on a slow, flaky, hostile Drive (CPU, the tiny model).

Runs `rl-swarm up` on a folder where another process's new files appear DRIVE_SIM_LAG seconds late and a
share of folder operations fail with EIO, with one hostile file of each kind planted in round 1's and
round 5's rollouts and in peers/. Then it reads the folder and the logs and reports: rounds completed,
whether every round kept every worker's rollouts, metrics line and rewards file, how many peers' groups
reached each worker, the failures injected and retried, and the files rejected, by kind.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from workers.shared_folder.drive_sim import FAILURE
from workers.shared_folder.hostile import plant_hostile_files

# what each kind of planted file is rejected for, as the readers' warnings say it
REJECTED_FOR = {"not valid JSON": "malformed or truncated JSON", "byte limit": "oversized",
                "is not a safe name": "unsafe node id", "must hold finite numbers": "wrong field types",
                "is not in this worker's TASKS": "unknown task", "schema version": "future schema",
                "checksum mismatch": "checksum mismatch"}


def run_trial(workers: int, lag: float, fail_rate: float, rounds: int, root: Path) -> dict:
    exp = root / "experiments" / "trial"
    planted = [*plant_hostile_files(exp, round_=1).values(), *plant_hostile_files(exp, round_=5).values()]
    fetch = max(10.0, 2.5 * lag)
    env = {**os.environ, "GDRIVE_PATH": str(root), "EXPERIMENT_NAME": "trial", "TEST_MODE": "true",
           "MODEL_NAME": "rl-swarm/tiny-gpt2", "DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "NUM_WORKERS": str(workers),
           "MAX_ROUNDS": str(rounds), "DRIVE_SIM_LAG": str(lag), "DRIVE_SIM_FAIL_RATE": str(fail_rate),
           "ROLLOUT_FETCH_TIMEOUT": str(fetch), "COORDINATOR_ROUND_INTERVAL": str(fetch + 4 * lag)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=env, capture_output=True,
                            text=True, timeout=3600)
    wall = time.monotonic() - started
    nodes = [f"worker-{i}" for i in range(1, workers + 1)]
    kept = {"rollouts": 0, "metrics lines": 0, "rewards files": 0}
    external = []
    for node in nodes:
        lines = (exp / "metrics" / node / "metrics.jsonl").read_text().splitlines()
        rows = {json.loads(line)["round"]: json.loads(line) for line in lines}
        kept["metrics lines"] += sum(r in rows for r in range(1, rounds + 1))
        external += [rows[r]["external_available"] for r in rows]
        for r in range(1, rounds + 1):
            kept["rollouts"] += (exp / "rollouts" / f"round_{r}" / "stage_0" / f"{node}.json").exists()
            kept["rewards files"] += (exp / "rewards" / f"round_{r}" / f"{node}.json").exists()
    logs = "\n".join(path.read_text(errors="replace") for path in (exp / "logs").rglob("*.log"))
    rejected: Counter = Counter()
    for line in logs.splitlines():
        if " rejected " in line:
            kind = next((k for s, k in REJECTED_FOR.items() if s in line), "other")
            rejected[kind] += 1
    finished = (exp / "state" / "finished.json").exists()
    return {"workers": workers, "lag_s": lag, "fail_rate": fail_rate, "rounds_asked": rounds,
            "rounds_completed": json.loads((exp / "state" / "finished.json").read_text())["rounds"] if finished else
            max((int(p.stem.split("_")[1]) for p in (exp / "state").glob("round_*.json")), default=0),
            "exit_code": result.returncode, "wall_s": round(wall, 1),
            "kept_of": workers * rounds, "kept": kept,
            "peer_groups_per_round": {"min": min(external), "max": max(external),
                                      "expected": (workers - 1) * int(env.get("NUM_TRAIN_SAMPLES", "4"))},
            "failures_injected": logs.count(f"{FAILURE} injected"),
            "retries_logged": len(re.findall(r"; retry \d/\d in", logs)),
            "planted_files": len(planted), "rejections_logged_by_kind": dict(sorted(rejected.items())),
            "validate": [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drive_trial")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lag", type=float, default=5.0)
    parser.add_argument("--fail-rate", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        print(json.dumps(run_trial(args.workers, args.lag, args.fail_rate, args.rounds, Path(root)), indent=2))


if __name__ == "__main__":
    main()
