"""Does the swarm learn at its defaults on the GPU model? A learning-rate sweep over seeds, and a long default run.

    python -m bench.learning run DRIVE [--seeds 1,2,3] [--arms default:500:100,1e-6:500:100,1e-5:150:50]
    python -m bench.learning report DRIVE [--out bench]    # bench/learning.json, the sweep's table, a plot
    python -m bench.learning sapo TABLE_DRIVE [--out bench]  # learning.json's "sapo" from `rl-swarm sapo-table`

Every arm is a plain `rl-swarm up` of MODEL_NAME=rl-swarm/gpt2-124m-random (swarm_supervisor.table), all at once
on one GPU; the arms of one seed share one warm-up. The default arm sets no LEARNING_RATE, so it measures the
default itself. An arm is LR:ROUNDS:EVAL_EVERY. GPT-2 124M checkpoints are 1 GB a worker: give the bench's
swarms a large CHECKPOINT_INTERVAL (in the environment) where the disk is small.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from configs_env.presets import TABLE_FAMILIES
from swarm_supervisor.table import Arm, ArmRunner, share_warmups
from swarm_supervisor.table_report import format_table, plot_table, table_rows
from workers.learning.model import GPT2_LEARNING_RATE

MODEL = "rl-swarm/gpt2-124m-random"
DEFAULT_LABEL = f"default (lr {GPT2_LEARNING_RATE:g})"


def plan(seeds: list[int], arms: list[str]) -> list[Arm]:
    """One swarm per seed and arm; `default` sets no LEARNING_RATE."""
    out = []
    for seed in seeds:
        for spec in arms:
            lr, rounds, every = spec.split(":")
            env = (("MAX_ROUNDS", rounds), ("EVAL_EVERY", every))
            if lr == "default":
                out.append(Arm(label=DEFAULT_LABEL, seed=seed, experiment=f"default-s{seed}", env=env))
            else:
                out.append(Arm(label=f"lr {float(lr):g}", seed=seed, experiment=f"lr{lr}-s{seed}",
                               env=(("LEARNING_RATE", lr), *env)))
    return out


def base_env(drive: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEARNING_RATE", "MAX_ROUNDS", "EVAL_EVERY", "PRESET", "SEED")}
    return {**env, "MODEL_NAME": MODEL, "GDRIVE_PATH": str(drive), "HF_HUB_OFFLINE": "1"}


def _git_sha() -> str:
    sha = os.environ.get("GIT_SHA")
    if sha:
        return sha
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def _rounded(values: tuple[float | None, ...]) -> list[float | None]:
    return [None if v is None else round(v, 4) for v in values]


def report(arms: list[Arm], drive: Path, out: Path, command: str, device: str | None = None) -> dict:
    env = base_env(drive)
    rows = table_rows(arms, {a.experiment: a.config(env).experiment_dir for a in arms}, arms[0].config(env).cache_dir,
                      common_rounds=False)
    default = next(r for r in rows if r.label == DEFAULT_LABEL)
    curves = default.reward_per_round
    result = {
        "device": device or _device(), "git_sha": _git_sha(),
        "default": {"model": MODEL, "learning_rate": GPT2_LEARNING_RATE, "seeds": list(default.seeds),
                    "rounds": list(default.rounds), "held_out_start": _rounded(default.held_out_start),
                    "held_out_end": _rounded(default.held_out_end),
                    "reward_first_50": [round(sum(c[:50]) / max(1, len(c[:50])), 4) for c in curves],
                    "reward_last_50": [round(sum(c[-50:]) / max(1, len(c[-50:])), 4) for c in curves]},
        "sweep": [row.to_json() for row in rows],
        "command": command,
    }
    out.mkdir(parents=True, exist_ok=True)
    try:                        # the SAPO table is measured apart (rl-swarm sapo-table); keep what it wrote
        result["sapo"] = json.loads((out / "learning.json").read_text()).get("sapo")
    except (OSError, ValueError):
        result["sapo"] = None
    (out / "learning.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "learning_sweep.txt").write_text(format_table(rows) + "\n")
    try:
        plot_table(rows, out / "learning_sweep.png")
    except ImportError:
        pass
    return result


def sapo_section(drive: Path, out: Path, command: str, device: str | None = None, git_sha: str | None = None) -> dict:
    """learning.json's "sapo": the table `rl-swarm sapo-table` saved under DRIVE/tables, per split and seed (made
    away from the GPU that ran it: name the device and the commit it ran)."""
    tables = sorted((drive / "tables").glob("*.json"))
    if not tables:
        raise SystemExit(f"python -m bench.learning sapo: no table under {drive / 'tables'}: run "
                         f"`rl-swarm sapo-table` with GDRIVE_PATH={drive} first")
    table = json.loads(tables[-1].read_text())
    rows = table["rows"]
    section = {"preset": ", ".join(TABLE_FAMILIES[table["family"]]), "command": command,
               "device": device or _device(), "git_sha": git_sha or _git_sha(),
               "rounds": min(min(row["rounds"]) for row in rows),
               "rows": [{key: row[key] for key in ("split", "seeds", "rounds", "rounds_reached", "cumulative_reward",
                                                   "held_out_start", "held_out_end", "task_rewards") if key in row}
                        for row in rows]}
    path = out / "learning.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["sapo"] = section
    path.write_text(json.dumps(result, indent=1) + "\n")
    return section


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning")
    parser.add_argument("action", choices=["run", "report", "sapo"])
    parser.add_argument("drive", type=Path)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--arms", default="default:1000:50,1e-6:1000:50,1e-5:200:50",
                        help="LR:ROUNDS:EVAL_EVERY, comma-separated; LR 'default' sets no LEARNING_RATE")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--device-name", default=None, help="for a report made away from the GPU that ran it")
    parser.add_argument("--git-sha", default=None, help="sapo: the commit the table ran at (a report made elsewhere)")
    parser.add_argument("--command", default="PRESET=paper-8-0 SEEDS=1,2,3 rl-swarm sapo-table",
                        help="sapo: the command that made the table, as recorded")
    args = parser.parse_args()
    if args.action == "sapo":
        print(json.dumps(sapo_section(args.drive, args.out, args.command, args.device_name, args.git_sha), indent=1))
        return 0
    arms = plan([int(s) for s in args.seeds.split(",")], [s for s in args.arms.split(",") if s])
    if args.action == "run":
        env, logs = base_env(args.drive), args.drive / "tables" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        share_warmups(arms, env, logs)
        codes = ArmRunner(arms, env, logs, parallel=len(arms), stall_s=1800).run()
        print(json.dumps(codes), flush=True)
    command = f"python -m bench.learning run DRIVE --seeds {args.seeds} --arms {args.arms}"
    result = report(arms, args.drive, args.out, command, args.device_name)
    print(json.dumps(result["default"], indent=1))
    print((args.out / "learning_sweep.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
