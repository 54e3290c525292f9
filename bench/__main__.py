"""`python -m bench all --out bench/results.json`: every benchmark in one run, then bench/RESULTS.md."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.peers import add_peers_arguments, bench_peers, peers_lines, peers_plan
from bench.memory_probe import NAIVE_SETUP, WORKER_SETUP, measure_train, worker_peak
from bench.swarm_stats import concurrent_timing, swarm_timing
from bench.workload import MODEL, generation_tok_s, scaling_process
from workers.learning.model import load_policy

HERE = Path(__file__).parent


def bench_generation(cache: Path) -> dict:
    policy = load_policy(MODEL, "cuda:0", cache)
    rows = []
    for batch in (16, 64, 256):
        row = {"batch": batch, "plain_tok_s": generation_tok_s(policy, batch, 256, fast=False)}
        try:
            row["fast_tok_s"] = generation_tok_s(policy, batch, 256, fast=True)
        except Exception as exc:  # noqa: BLE001 - a failing fast path is a result to report, not a crash
            row["fast_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
    default = rows[0]
    return {"rows": rows, "plain_tok_s": default["plain_tok_s"], "fast_tok_s": default.get("fast_tok_s")}


def bench_train(cache: Path) -> dict:
    """One update of 16 rows x 256 completion tokens: the straightforward way, ours, ours without checkpointing."""
    no_ckpt = {**WORKER_SETUP, "name": "ours without activation checkpointing", "ckpt": False}
    # the naive path's optimizer, to tell what the chunked log-probs cost from what the memory savings cost
    fp32 = {**no_ckpt, "name": "ours without checkpointing, fp32 fused AdamW", "opt": "fp32"}
    big = {**WORKER_SETUP, "name": "ours with 1024-row chunks", "chunk": 1024}
    rows = {"naive": NAIVE_SETUP, "ours": WORKER_SETUP, "ours_chunk_1024": big, "ours_no_checkpointing": no_ckpt,
            "ours_fp32_adamw": fp32}
    out = {}
    for key, setup in rows.items():
        row = measure_train(cache, setup)
        out[key] = {"name": setup["name"], "seconds": row["seconds"], "peak_gib": row["peak_alloc_gib"]}
    return out


def bench_worker_memory(cache: Path) -> dict:
    """A worker's worst case (every completion 256 tokens, generate then update, 8 rounds) by NVML, and the
    supervisor's pre-start estimate for it."""
    from transformers import AutoConfig

    from configs_env import SwarmConfig
    from workers.learning.memory import estimate_worker_mib
    from workers.learning.model import model_source

    row = worker_peak(cache, WORKER_SETUP)
    config = AutoConfig.from_pretrained(model_source(MODEL, cache))
    return {"nvml_peak_gib": row["nvml_peak_gib"], "nvml_peak_by_round": row["nvml_peak_by_cycle"],
            "estimate_gib": estimate_worker_mib(config, SwarmConfig.from_env({}), checkpointing=True) / 1024}


def bench_swarm(cache: Path, rounds: int, **settings: str) -> dict:
    """`rl-swarm up` (the default preset unless `settings` name another) for `rounds` rounds: seconds per round, where
    they go, and NVML memory per worker."""
    drive = Path(tempfile.mkdtemp())
    env = {**os.environ, "GDRIVE_PATH": str(drive), "RL_SWARM_CACHE": str(cache), "MODEL_NAME": MODEL,
           "MAX_ROUNDS": str(rounds), "HF_HUB_OFFLINE": "1", "EXPERIMENT_NAME": "bench", **settings}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=env, capture_output=True, text=True,
                            timeout=420)
    wall = time.monotonic() - started
    exp = drive / "experiments" / "bench"
    if result.returncode != 0:
        return {"error": (result.stdout + result.stderr)[-800:]}
    states = [json.loads((exp / "state" / f"round_{r:06d}.json").read_text())["started_at"] for r in (2, rounds)]
    samples = [json.loads(line) for line in (exp / "logs" / "supervisor" / "monitor.jsonl").read_text().splitlines()]

    def peak_until(until: float) -> float:
        return max([(v["gpu_mib"] or 0) for row in samples if row["time"] <= until
                    for v in row["nodes"].values()] or [0]) / 1024

    peak = peak_until(float("inf"))
    round_11 = json.loads((exp / "state" / "round_000011.json").read_text())["started_at"]
    metrics = [json.loads(line) for line in (exp / "metrics" / "worker-1" / "metrics.jsonl").read_text().splitlines()]
    # the allocator's own peak, exact, from every worker's metrics (NVML sampled once a second can miss a
    # 0.1 s update's peak in round 10 and catch it by round 200)
    everyone = [json.loads(line) for path in sorted((exp / "metrics").glob("*/metrics.jsonl"))
                for line in path.read_text().splitlines()]

    def torch_peak(last_round: int) -> float | None:
        values = [m["gpu_peak_mib"] for m in everyone if m["round"] <= last_round and m.get("gpu_peak_mib")]
        return max(values) / 1024 if values else None

    timing = swarm_timing(exp)
    return {"rounds": rounds, "wall_s": wall, "seconds_per_round": (states[1] - states[0]) / (rounds - 2),
            "worker_work_seconds": timing.get("worker_work_seconds"), "hops": timing.get("hops"),
            "peak_gib_per_worker": peak, "peak_gib_by_round_10": peak_until(round_11),
            "torch_peak_gib_by_round_10": torch_peak(10), "torch_peak_gib": torch_peak(rounds),
            "mean_completion_tokens": sum(m["mean_completion_tokens"] for m in metrics) / len(metrics),
            "final_reward_mean": sum(m["reward_mean"] for m in metrics[-5:]) / 5}


def bench_scaling(cache: Path, counts: tuple[int, ...], seconds: float = 10.0) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for n in counts:
        queue = ctx.Queue()
        procs = [ctx.Process(target=scaling_process, args=(str(cache), seconds, 16, 256, queue)) for _ in range(n)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=seconds + 180) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        rows.append({"workers": n, "tok_s": sum(r["tokens"] / r["seconds"] for r in results),
                     "peak_gib_per_worker": max(r["peak_gib"] for r in results)})
    return rows


def _swarm_lines(s: dict) -> list[str]:
    if "error" in s:
        return [f"failed: {s['error']}"]
    growth = 100 * (s["peak_gib_per_worker"] / s["peak_gib_by_round_10"] - 1) if s.get("peak_gib_by_round_10") else 0
    return [f"- rounds: {s['rounds']}, wall {s['wall_s']:.0f}s (warm-up and start-up included)",
            f"- seconds per round: **{s['seconds_per_round']:.2f}** (target <= 1.8: 2000 rounds in "
            f"{2000 * s['seconds_per_round'] / 3600:.2f} h)",
            f"- peak GPU per worker (NVML, CUDA context included): **{s['peak_gib_per_worker']:.2f} GiB** "
            "(target <= 3); "
            f"by round 10: {s['peak_gib_by_round_10']:.2f} GiB (growth {growth:+.1f}%)",
            *([f"- torch allocator's peak (exact, every worker, CUDA context not included): "
               f"{s['torch_peak_gib_by_round_10']:.3f} GiB by round 10, {s['torch_peak_gib']:.3f} GiB by round "
               f"{s['rounds']} (growth {100 * (s['torch_peak_gib'] / s['torch_peak_gib_by_round_10'] - 1):+.1f}%)"]
              if s.get("torch_peak_gib") and s.get("torch_peak_gib_by_round_10") else []),
            f"- mean completion tokens: {s['mean_completion_tokens']:.1f}, mean reward of the last 5 rounds "
            f"(worker-1): {s['final_reward_mean']:.3f}", *_hop_lines(s)]


HOPS = (("generate_s", "generate (a worker's own completions)"), ("score_s", "score them"),
        ("fetch_s", "publish ours, wait for and re-score the peers' rollouts"), ("train_s", "train (the update)"),
        ("worker_round_s", "a worker's whole round"), ("slowest_worker_round_s", "the slowest worker's round"),
        ("between_rounds_s", "hand-off between rounds (wall minus the slowest worker's round)"))


def _hop_lines(s: dict) -> list[str]:
    """A round, hop by hop: mean seconds over rounds and workers (start-up rounds left out)."""
    hops = s.get("hops")
    if not hops:
        return []
    lines = [f"- the slowest worker's own work (generate + score + train) per round: "
             f"{s['worker_work_seconds']:.3f} s; wall per round / that work: "
             f"**{s['seconds_per_round'] / s['worker_work_seconds']:.2f}** (target <= 1.5)", "",
             "| hop | mean seconds |", "|---|---|"]
    lines += [f"| {text} | {hops[key]:.3f} |" for key, text in HOPS if key in hops]
    return lines


def render(results: dict) -> str:
    """bench/RESULTS.md: a table per part, each with the command that measured it."""
    commands = results.get("commands", {})
    lines = [f"# Benchmarks ({results['device']}, {results['date']}, git {results['git_sha'][:10]}, "
             f"torch {results['torch']})", "",
             "Made by `GIT_SHA=<commit> python -m bench all --out bench/results.json` on the GPU machine "
             "(`--parts` splits it over device calls of at most 10 minutes; each section names its own run).", ""]

    def heading(title: str, part: str) -> None:
        lines.extend([f"## {title}", "", f"`{commands.get(part, 'python -m bench all')}`", ""])

    if "generation" in results:
        heading("Generation (GPT-2 124M shapes, 256 new tokens, T=1.0, every row forced to 256 tokens)", "generation")
        lines += ["| batch | plain `generate` tok/s | workers' fast path tok/s | speed-up (target >= 4x) |",
                  "|---|---|---|---|"]
        for row in results["generation"]["rows"]:
            fast = row.get("fast_tok_s")
            lines.append(f"| {row['batch']} | {row['plain_tok_s']:.0f} | "
                         f"{'%.0f' % fast if fast else row.get('fast_error', '-')} | "
                         f"{'%.2fx' % (fast / row['plain_tok_s']) if fast else '-'} |")
    if "train" in results:
        lines.append("")
        heading("Train step (16 rows x 256 completion tokens + 48 prompt tokens, bf16 autocast)", "train")
        lines += ["| path | seconds | peak GiB (torch allocator) |", "|---|---|---|"]
        for key, row in results["train"].items():
            lines.append(f"| {row.get('name', key)} | {row['seconds']:.4f} | {row['peak_gib']:.2f} |")
    w = results.get("worker_memory")
    if w:
        lines.append("")
        heading("One worker's worst case by NVML (generate 8 x 256 tokens, update 16 x 256, 8 rounds)",
                "worker_memory")
        lines += [f"- peak **{w['nvml_peak_gib']:.2f} GiB**, CUDA context included (target <= 3); by round: "
                  + ", ".join(f"{x:.2f}" for x in w["nvml_peak_by_round"]),
                  f"- the supervisor's pre-start estimate for it: {w['estimate_gib']:.2f} GiB"]
    if "swarm_default" in results:
        lines.append("")
        heading("Whole default swarm (`rl-swarm up`: 4 workers, I=2, J=2, G=4, max 256 new tokens, warmed-up base)",
                "swarm_default")
        lines += _swarm_lines(results["swarm_default"])
    if "swarm_paper" in results:
        lines.append("")
        heading("The paper's shape (`PRESET=paper-4-4`: 8 workers, G=8, I=4, J=4, max 256 new tokens, warmed-up base)",
                "swarm_paper")
        lines += _swarm_lines(results["swarm_paper"])
    x3 = results.get("swarm_default_x3")
    if x3:
        lines.append("")
        heading(f"Default swarms side by side ({x3['swarms']} swarms, {x3['workers']} workers, {x3['device']}, "
                f"git {x3['git_sha']})", "swarm_default_x3")
        lines += [f"- {x3['note']}",
                  f"- seconds per round, mean of the swarms: **{x3['seconds_per_round']:.3f}**; the slowest worker's "
                  f"own work: {x3['worker_work_seconds']:.3f} s; wall / work: "
                  f"**{x3['seconds_per_round'] / x3['worker_work_seconds']:.2f}** (target <= 1.5); peak GPU per "
                  f"worker (NVML): {x3['peak_gib_per_worker']:.2f} GiB", "",
                  "| swarm | rounds | s/round | " + " | ".join(text for _, text in HOPS) + " |",
                  "|---|---|---|" + "---|" * len(HOPS)]
        for name, one in x3["per_swarm"].items():
            lines.append(f"| {name} | {one['rounds']} | {one['seconds_per_round']:.3f} | "
                         + " | ".join(f"{one['hops'][key]:.3f}" for key, _ in HOPS) + " |")
    t = results.get("sapo_table")
    if t and "error" not in t:
        lines.append("")
        heading(f"Four paper swarms at once (`rl-swarm sapo-table`: {t['swarms_at_once']} swarms, "
                f"{t['workers_at_once']} workers)", "sapo_table")
        lines += [f"- seconds per round, mean over the splits and seeds: **{t['seconds_per_round']:.2f}** "
                  f"(target <= 1.2); peak GPU per worker (NVML): {t['peak_gib_per_worker']:.2f} GiB", "",
                  "| seed | split | seconds per round | slowest worker's work | hand-off between rounds |",
                  "|---|---|---|---|---|"]
        for seed, batch in t["by_seed"].items():
            for name, one in batch["per_swarm"].items():
                if "error" not in one:
                    lines.append(f"| {seed} | {name} | {one['seconds_per_round']:.2f} | "
                                 f"{one['worker_work_seconds']:.3f} | {one['hops']['between_rounds_s']:.3f} |")
    if "swarm_worst_case" in results:
        lines.append("")
        heading("Worst-case swarm (WARMUP_STEPS=0: a random-init model writes all 256 tokens every time)",
                "swarm_worst_case")
        lines += _swarm_lines(results["swarm_worst_case"])
        lines.append("- every reward is 0 for a random-init model, so no update runs in these rounds: this row "
                     "measures generation and the exchange at their longest")
    if "scaling" in results:
        lines.append("")
        heading("Scaling (N processes generating at once on one GPU, batch 16, 256 tokens, the fast path)",
                "scaling")
        lines += ["| workers | aggregate tok/s | peak GiB per worker (torch reserved) |", "|---|---|---|"]
        for row in results["scaling"]:
            lines.append(f"| {row['workers']} | {row['tok_s']:.0f} | {row['peak_gib_per_worker']:.2f} |")
    if "peers" in results:
        lines.append("")
        heading("Side by side with TRL's GRPOTrainer (issue 20; bench/PEERS.md)", "peers")
        lines += peers_lines(results["peers"])
    lines += ["", "## Against the targets (issues 8 and 18)", ""] + [f"- {line}" for line in verdicts(results)]
    return "\n".join(lines) + "\n"


def verdicts(results: dict) -> list[str]:
    """One line per target: met or missed, with the number that decides it."""
    out = []

    def say(met: bool, text: str) -> None:
        out.append(f"{'met' if met else '**missed**'}: {text}")

    s = results.get("swarm_default", {})
    if "seconds_per_round" in s:
        say(s["seconds_per_round"] <= 1.8, f"2000 rounds in <= 1 h: {s['seconds_per_round']:.2f} s per round "
            f"(with the warmed-up model's {s['mean_completion_tokens']:.0f}-token answers)")
        if s.get("torch_peak_gib") and s.get("torch_peak_gib_by_round_10"):
            # NVML is sampled once a second and misses brief peaks; the allocator's peak is exact
            growth = s["torch_peak_gib"] / s["torch_peak_gib_by_round_10"] - 1
            say(abs(growth) <= 0.01, f"no memory growth over rounds (allocator's exact peak): "
                f"{s['torch_peak_gib_by_round_10']:.3f} GiB by round 10, {s['torch_peak_gib']:.3f} GiB by round "
                f"{s['rounds']} ({100 * growth:+.1f}%)")
        else:
            growth = s["peak_gib_per_worker"] / s["peak_gib_by_round_10"] - 1
            say(abs(growth) <= 0.01, f"no memory growth over rounds: peak {s['peak_gib_by_round_10']:.2f} GiB by "
                f"round 10, {s['peak_gib_per_worker']:.2f} GiB by round {s['rounds']} ({100 * growth:+.1f}%)")
    if s.get("worker_work_seconds"):
        ratio = s["seconds_per_round"] / s["worker_work_seconds"]
        say(s["seconds_per_round"] <= 0.30, f"default swarm <= 0.30 s per round: {s['seconds_per_round']:.2f} s")
        say(ratio <= 1.5, f"wall per round / slowest worker's work <= 1.5: {ratio:.2f}")
    x3 = results.get("swarm_default_x3", {})
    if x3.get("worker_work_seconds"):
        say(x3["seconds_per_round"] / x3["worker_work_seconds"] <= 1.5, f"wall per round / slowest worker's work "
            f"<= 1.5 with three default swarms side by side: {x3['seconds_per_round'] / x3['worker_work_seconds']:.2f}"
            f" ({x3['seconds_per_round']:.3f} s a round, {x3['worker_work_seconds']:.3f} s of work)")
    p = results.get("swarm_paper", {})
    if "seconds_per_round" in p:
        say(p["seconds_per_round"] <= 0.6, f"paper shape <= 0.6 s per round: {p['seconds_per_round']:.2f} s")
        say(p["peak_gib_per_worker"] <= 3, f"paper shape <= 3 GiB per worker (NVML): {p['peak_gib_per_worker']:.2f}")
    t = results.get("sapo_table", {})
    if t.get("seconds_per_round"):
        say(t["seconds_per_round"] <= 1.2, f"four paper swarms at once <= 1.2 s per round: "
            f"{t['seconds_per_round']:.2f} s ({t['workers_at_once']} workers)")
    worst = results.get("swarm_worst_case", {})
    if "seconds_per_round" in worst:
        say(worst["seconds_per_round"] <= 1.0, f"worst case (every completion 256 tokens) <= 1.0 s per round: "
            f"{worst['seconds_per_round']:.2f} s")
    w = results.get("worker_memory")
    if w:
        peak = max(w["nvml_peak_gib"], s.get("peak_gib_per_worker", 0))
        say(peak <= 3, f"<= 3 GiB per worker by NVML: {peak:.2f} GiB at the worst case; the pre-start estimate "
            f"says {w['estimate_gib']:.2f} GiB, so 16 workers need {16 * w['estimate_gib']:.0f} GiB of an 80 GB GPU")
    g = results.get("generation")
    if g:
        speedups = {row["batch"]: row["fast_tok_s"] / row["plain_tok_s"] for row in g["rows"] if row.get("fast_tok_s")}
        shown = ", ".join(f"{v:.2f}x at batch {b}" for b, v in speedups.items())
        say(bool(speedups) and min(speedups.values()) >= 4, f"generation >= 4x plain `generate`: {shown}")
    t = results.get("train")
    if t and "naive" in t:
        naive = t["naive"]
        for key in ("ours", "ours_fp32_adamw"):
            if key in t:
                row = t[key]
                say(row["seconds"] <= naive["seconds"] and row["peak_gib"] < naive["peak_gib"],
                    f"train step at least as fast as full logits, with less memory ({row['name']}): "
                    f"{row['seconds']:.3f} s vs {naive['seconds']:.3f} s, {row['peak_gib']:.2f} vs "
                    f"{naive['peak_gib']:.2f} GiB")
    return out


def bench_sapo_table(drive: Path) -> dict:
    """The SAPO table's swarms as `rl-swarm sapo-table` ran them (its splits of one seed at once): seconds per round
    of each batch of swarms that ran together, read from their folders."""
    tables = sorted(drive.glob("tables/*.json"))
    if not tables:
        return {"error": f"no table under {drive}/tables: run `rl-swarm sapo-table` with GDRIVE_PATH={drive} first"}
    table = json.loads(tables[-1].read_text())
    seeds = table["seeds"]
    batches = {seed: [drive / "experiments" / row["experiments"][i] for row in table["rows"]]
               for i, seed in enumerate(seeds)}
    timed = {str(seed): concurrent_timing(dirs) for seed, dirs in batches.items()}
    good = [t for t in timed.values() if t["seconds_per_round"]]
    return {"family": table["family"], "swarms_at_once": len(table["rows"]),
            "workers_at_once": max((t["workers"] for t in good), default=0),
            "seconds_per_round": sum(t["seconds_per_round"] for t in good) / len(good) if good else None,
            "peak_gib_per_worker": max((t["peak_gib_per_worker"] or 0 for t in good), default=None),
            "by_seed": timed}


PARTS = ("generation", "train", "worker_memory", "swarm_default", "swarm_paper", "swarm_worst_case", "sapo_table",
         "scaling", "profile", "peers")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("what", choices=["all"])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated subset of " + ", ".join(PARTS) + " (a device call lasts 10 minutes)")
    parser.add_argument("--merge", action="store_true", help="keep the parts already in --out that this run skips")
    parser.add_argument("--table-drive", type=Path, default=None,
                        help="sapo_table: the GDRIVE_PATH a `PRESET=paper-8-0 rl-swarm sapo-table` ran in")
    add_peers_arguments(parser)
    args = parser.parse_args()
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if "sapo_table" in parts and not args.table_drive:
        parser.error("--parts sapo_table needs --table-drive DRIVE (where `rl-swarm sapo-table` ran)")
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    cache = Path(os.environ.get("RL_SWARM_CACHE") or tempfile.mkdtemp())    # a test reuses its built model
    # the device's copy of the tree may have no usable .git: the caller passes the commit it sent
    sha = os.environ.get("GIT_SHA") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                      text=True).stdout.strip() or "unknown"
    results = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    commands = results.get("commands", {})
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results.update({"device": device, "git_sha": sha, "date": time.strftime("%Y-%m-%d"),
                    "torch": torch.__version__})
    runs = {"generation": lambda: bench_generation(cache), "train": lambda: bench_train(cache),
            "worker_memory": lambda: bench_worker_memory(cache),
            "swarm_default": lambda: bench_swarm(cache, args.rounds),
            "swarm_paper": lambda: bench_swarm(cache, min(args.rounds, 100), PRESET="paper-4-4"),
            "swarm_worst_case": lambda: bench_swarm(cache, 40, WARMUP_STEPS="0"),
            "sapo_table": lambda: bench_sapo_table(args.table_drive or Path("/nonexistent")),
            "scaling": lambda: bench_scaling(cache, (1, 2, 4, 8, 16)),
            "peers": lambda: bench_peers(peers_plan(args, cache), lambda partial: save({**results, "peers": partial}))}
    command = f"GIT_SHA={sha[:10]} python -m bench all --rounds {args.rounds} --parts {','.join(parts)}"
    if "peers" in parts:
        command += (f" --peers-updates {args.peers_updates} --peers-many-updates {args.peers_many_updates} "
                    f"--peers-warmup {args.peers_warmup} --peers-procs {args.peers_procs}"
                    + (" --peers-quick" if args.peers_quick else ""))

    def save(partial: dict) -> None:
        args.out.write_text(json.dumps({**partial, "commands": {**commands, "peers": command}}, indent=2))

    for name in parts:
        started = time.monotonic()
        if name == "profile":
            from bench.profile_round import profile_round

            args.out.with_name("profile.txt").write_text(profile_round(cache) + "\n")
        else:
            results[name] = runs[name]()
        commands[name] = command
        print(f"{name}: {time.monotonic() - started:.0f}s {json.dumps(results.get(name))[:400]}", flush=True)
        results["commands"] = commands
        args.out.write_text(json.dumps(results, indent=2))
    args.out.with_name("RESULTS.md").write_text(render(results))


if __name__ == "__main__":
    main()
