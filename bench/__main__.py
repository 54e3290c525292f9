"""`python -m bench all --out bench/results.json`: every benchmark in one run, then bench/RESULTS.md."""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.peers import read_profile, add_peers_arguments, bench_peers, peers_plan
from bench.memory_probe import GRAPHS_SETUP, NAIVE_SETUP, WORKER_SETUP, measure_train, worker_peak
from bench.report import render
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
    rows = {"naive": NAIVE_SETUP, "ours_graphs": GRAPHS_SETUP, "ours": WORKER_SETUP, "ours_chunk_1024": big,
            "ours_no_checkpointing": no_ckpt, "ours_fp32_adamw": fp32}
    out = {}
    for key, setup in rows.items():
        row = measure_train(cache, setup)
        out[key] = {"name": setup["name"], "seconds": row["seconds"], "peak_gib": row["peak_alloc_gib"],
                    "peak_reserved_gib": row["peak_reserved_gib"]}
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


def bench_swarm(cache: Path, rounds: int, seconds: float = 420, **settings: str) -> dict:
    """`rl-swarm up` (the default preset unless `settings` name another) for `rounds` rounds: seconds per round, where
    they go, and NVML memory per worker. A swarm still running after `seconds` is stopped as Ctrl-C stops it, and
    what it measured by then is the result, with the round it reached as "cut_at_round"."""
    drive = Path(tempfile.mkdtemp())
    env = {**os.environ, "GDRIVE_PATH": str(drive), "RL_SWARM_CACHE": str(cache), "MODEL_NAME": MODEL,
           "MAX_ROUNDS": str(rounds), "HF_HUB_OFFLINE": "1", "EXPERIMENT_NAME": "bench", **settings}
    started = time.monotonic()
    returncode, output, cut = _run_swarm(env, seconds)
    wall = time.monotonic() - started
    exp = drive / "experiments" / "bench"
    reached = max((int(path.stem.removeprefix("round_")) for path in (exp / "state").glob("round_*.json")
                   if path.stem.removeprefix("round_").isdigit()), default=0) if (exp / "state").is_dir() else 0
    if cut:
        rounds = reached - 1        # the round it was in when stopped may not have finished
    if (returncode != 0 and not cut) or rounds < 12:
        return {"error": f"exit {returncode}{f', cut after {seconds:.0f} s at round {reached}' if cut else ''}: "
                         + output[-800:]}
    result = swarm_result(exp, rounds, wall, settings.get("PROFILE_ROUND"))
    return {**({"cut_at_round": reached} if cut else {}), **result}


def swarm_result(exp: Path, rounds: int, wall: float | None, profiled: str | None = None) -> dict:
    """What bench_swarm reports of the experiment folder `exp` over its rounds 1..`rounds` (also for a swarm's
    folder fetched from the device after its bench was cut)."""
    states = [json.loads((exp / "state" / f"round_{r:06d}.json").read_text())["started_at"] for r in (2, rounds)]
    samples = [json.loads(line) for line in (exp / "logs" / "supervisor" / "monitor.jsonl").read_text().splitlines()]

    def peak_until(until: float) -> float:
        return max([(v["gpu_mib"] or 0) for row in samples if row["time"] <= until
                    for v in row["nodes"].values()] or [0]) / 1024

    peak = peak_until(float("inf"))
    # host RAM per worker: RSS counts in full the CUDA and torch libraries every worker maps; PSS shares them out
    host = {key: max([(v.get(key) or 0) for row in samples for v in row["nodes"].values()] or [0]) / 1024 or None
            for key in ("rss_mib", "pss_mib")}
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
    profile = {"profile": read_profile(exp / "logs" / "worker-1" / f"profile-round-{profiled}.txt")} if profiled else {}
    return {**profile, "rounds": rounds, "wall_s": wall,
            "seconds_per_round": (states[1] - states[0]) / (rounds - 2),
            "worker_work_seconds": timing.get("worker_work_seconds"), "hops": timing.get("hops"),
            **{key: timing[key] for key in ("quiet_rounds", "seconds_per_quiet_round", "quiet_worker_work_seconds",
                                            "held_out") if timing.get(key) is not None},
            "peak_gib_per_worker": peak, "peak_gib_by_round_10": peak_until(round_11),
            "host_rss_gib_per_worker": host["rss_mib"], "host_pss_gib_per_worker": host["pss_mib"],
            "torch_peak_gib_by_round_10": torch_peak(10), "torch_peak_gib": torch_peak(rounds),
            "mean_completion_tokens": sum(m["mean_completion_tokens"] for m in metrics) / len(metrics),
            "final_reward_mean": sum(m["reward_mean"] for m in metrics[-5:]) / 5}


def _run_swarm(env: dict, seconds: float, command: tuple[str, ...] = ("-m", "swarm_supervisor", "up"),
               grace: float = 60) -> tuple[int, str, bool]:
    """`rl-swarm up` in `env` for at most `seconds`: its exit code, the tail of its output, and whether it was cut.
    Cut means stopped with SIGINT (checkpointed, its metrics whole), then killed if it has not exited `grace` on."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *command], env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        cut = False
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            cut = True
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        finally:
            if proc.poll() is None:     # this bench itself was stopped: the swarm goes with it
                proc.kill()
                proc.wait(timeout=30)
        log.seek(0)
        return proc.returncode, log.read()[-4000:], cut


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("what", choices=["all"])
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated subset of " + ", ".join(PARTS) + " (a device call lasts 10 minutes)")
    parser.add_argument("--swarm-seconds", type=float, default=420,
                        help="swarm parts: stop a swarm after this long and report the rounds it finished")
    parser.add_argument("--merge", action="store_true", help="keep the parts already in --out that this run skips")
    parser.add_argument("--table-drive", type=Path, default=None,
                        help="sapo_table: the GDRIVE_PATH a `PRESET=paper-8-0 rl-swarm sapo-table` ran in")
    add_peers_arguments(parser)
    return parser


def _write_profiles(out: Path, name: str, result: object) -> None:
    """A part's torch-profiler tables go beside --out, not into results.json."""
    if name == "peers" and isinstance(result, dict):     # one update of each side: where its time goes
        profiles = result.pop("profile", None) or {}
        out.with_name("peers_profile.txt").write_text(
            "".join(f"## {side}\n\n{text}\n" for side, text in profiles.items() if text))
    elif isinstance(result, dict) and "profile" in result:     # one round of worker-1
        out.with_name(f"{name}_profile.txt").write_text(result.pop("profile") + "\n")


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    # `timeout` stops a device run with SIGTERM: exit through the finally blocks, which stop the swarms started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
            "swarm_default": lambda: bench_swarm(cache, args.rounds, args.swarm_seconds),
            "swarm_paper": lambda: bench_swarm(cache, min(args.rounds, 100), args.swarm_seconds, PRESET="paper-4-4",
                                                 PROFILE_ROUND=str(min(50, max(3, args.rounds - 10)))),
            "swarm_worst_case": lambda: bench_swarm(cache, 40, args.swarm_seconds, WARMUP_STEPS="0"),
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
            _write_profiles(args.out, name, results[name])
        commands[name] = command
        print(f"{name}: {time.monotonic() - started:.0f}s {json.dumps(results.get(name))[:400]}", flush=True)
        results["commands"] = commands
        args.out.write_text(json.dumps(results, indent=2))
    args.out.with_name("RESULTS.md").write_text(render(results))


if __name__ == "__main__":
    main()
