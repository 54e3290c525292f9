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

from bench.workload import MODEL, generation_tok_s, scaling_process, train_step
from workers.model import load_policy

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
    out = {}
    for name, naive in (("naive", True), ("ours", False)):
        policy = load_policy(MODEL, "cuda:0", cache)
        out[name] = train_step(policy, rows=16, completion_len=256, naive=naive)
        del policy
        torch.cuda.empty_cache()
    return out


def bench_swarm(cache: Path, rounds: int) -> dict:
    drive = Path(tempfile.mkdtemp())
    env = {**os.environ, "GDRIVE_PATH": str(drive), "RL_SWARM_CACHE": str(cache), "MODEL_NAME": MODEL,
           "MAX_ROUNDS": str(rounds), "HF_HUB_OFFLINE": "1", "EXPERIMENT_NAME": "bench"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=env, capture_output=True, text=True,
                            timeout=420)
    wall = time.monotonic() - started
    exp = drive / "experiments" / "bench"
    if result.returncode != 0:
        return {"error": (result.stdout + result.stderr)[-800:]}
    states = [json.loads((exp / "state" / f"round_{r:06d}.json").read_text())["started_at"] for r in (2, rounds)]
    samples = [json.loads(line) for line in (exp / "logs" / "supervisor" / "monitor.jsonl").read_text().splitlines()]
    peak = max((v["gpu_mib"] or 0) for row in samples for v in row["nodes"].values()) / 1024
    metrics = [json.loads(line) for line in (exp / "metrics" / "worker-1" / "metrics.jsonl").read_text().splitlines()]
    return {"rounds": rounds, "wall_s": wall, "seconds_per_round": (states[1] - states[0]) / (rounds - 2),
            "peak_gib_per_worker": peak,
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


def render(results: dict) -> str:
    g, t, s = results["generation"], results["train"], results["swarm_default"]
    lines = [f"# Benchmarks ({results['device']}, {results['date']}, git {results['git_sha'][:10]})", "",
             f"Command: `{results['command']}`", "", "## Generation (GPT-2 124M shapes, 256 new tokens, T=1.0)", "",
             "| batch | plain tok/s | fast tok/s | speed-up |", "|---|---|---|---|"]
    for row in g["rows"]:
        fast = row.get("fast_tok_s")
        lines.append(f"| {row['batch']} | {row['plain_tok_s']:.0f} | "
                     f"{'%.0f' % fast if fast else row.get('fast_error', '-')} | "
                     f"{'%.2fx' % (fast / row['plain_tok_s']) if fast else '-'} |")
    lines += ["", "## Train step (16 rows x 256 completion tokens, bf16 autocast, fused AdamW)", "",
              "| path | seconds | peak GiB |", "|---|---|---|"]
    for name in ("naive", "ours"):
        lines.append(f"| {name} | {t[name]['seconds']:.4f} | {t[name]['peak_gib']:.2f} |")
    lines += ["", "## Whole default swarm (4 workers, I=2, J=2, G=4, max 256 new tokens)", ""]
    if "error" in s:
        lines.append(f"failed: {s['error']}")
    else:
        lines += [f"- rounds: {s['rounds']}, wall {s['wall_s']:.0f}s (warm-up and start-up included)",
                  f"- seconds per round: {s['seconds_per_round']:.2f} (target <= 1.8)",
                  f"- peak GPU per worker (NVML, CUDA context included): {s['peak_gib_per_worker']:.2f} GiB "
                  "(target <= 3)", f"- mean completion tokens: {s['mean_completion_tokens']:.1f}"]
    lines += ["", "## Scaling (N processes generating at once, batch 16, 256 tokens, the workers' fast path)", "",
              "| workers | aggregate tok/s | peak GiB per worker |", "|---|---|---|"]
    for row in results["scaling"]:
        lines.append(f"| {row['workers']} | {row['tok_s']:.0f} | {row['peak_gib_per_worker']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("what", choices=["all"])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp())
    # the device's copy of the tree may have no usable .git: the caller passes the commit it sent
    sha = os.environ.get("GIT_SHA") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                      text=True).stdout.strip() or "unknown"
    results = {"device": torch.cuda.get_device_name(0), "git_sha": sha, "date": time.strftime("%Y-%m-%d"),
               "command": "python -m bench all --out bench/results.json", "torch": torch.__version__}
    for name, run in (("generation", lambda: bench_generation(cache)), ("train", lambda: bench_train(cache)),
                      ("swarm_default", lambda: bench_swarm(cache, args.rounds)),
                      ("scaling", lambda: bench_scaling(cache, (1, 2, 4, 8, 16)))):
        started = time.monotonic()
        results[name] = run()
        print(f"{name}: {time.monotonic() - started:.0f}s {json.dumps(results[name])[:400]}", flush=True)
        args.out.write_text(json.dumps(results, indent=2))
    args.out.with_name("RESULTS.md").write_text(render(results))
    from bench.profile_round import profile_round

    args.out.with_name("profile.txt").write_text(profile_round(cache) + "\n")


if __name__ == "__main__":
    main()
