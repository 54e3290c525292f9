"""`python -m bench all --parts peers`: rl-swarm beside TRL's GRPOTrainer on one GPU, the same GRPO workload (issue 20).

Both start from one warmed-up base (`rl-swarm pretrain`), train on the same reasoning-gym questions (TRL's process
k reads the questions rl-swarm's worker k draws), are scored by rl-swarm's scorer, and are evaluated by rl-swarm's
held-out evaluation. Phases, one after another so none shares the GPU with another: each side alone, then N
processes at once for each N of --peers-procs (TRL: N trainers; rl-swarm: a swarm with I=4, J=0 and one with the
default I=2, J=2). Peak memory per process is sampled from NVML (the supervisor's Monitor) every 50 ms; on a CPU
the process's RSS stands in. bench/PEERS.md lists the settings and the device command.
"""

import argparse
import json
import os
import signal
import subprocess
import tempfile
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median
from typing import Callable

import psutil

from configs_env import SwarmConfig
from swarm_supervisor.monitor import Monitor
from swarm_supervisor.table import copy_base
from workers.shared_folder.held_out import read_held_out
from workers.shared_folder.signing import KeyRing
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import read_json_bounded
from bench.swarm_stats import round_starts
from bench.workload import MODEL

LIKE_FOR_LIKE, DEFAULT_SPLIT = (4, 0), (2, 2)        # (I, J): 16 completions an update either way (G=4)
SAMPLE_EVERY = 0.05                                  # seconds between memory samples
STOP_MARGIN = 45.0                                   # seconds kept after a phase's training for its evaluation


@dataclass(frozen=True)
class PeersPlan:
    model: str
    work: Path              # drives, TRL's output folders, every process's log
    cache: Path             # RL_SWARM_CACHE: the offline model, built once
    updates: int            # measured updates per process alone and in the first --peers-procs run (held-out)
    many_updates: int       # measured updates per process in the later --peers-procs runs
    warmup_updates: int     # updates before the measured ones (allocator, CUDA graphs, first batches)
    counts: tuple[int, ...]
    deadline: float         # wall clock: no phase starts after it, training stops STOP_MARGIN before it
    quick: bool             # CPU smoke: 32 new tokens, 8 held-out questions, a 2-step warm-up
    default_split: bool = True      # also run rl-swarm's default I=2, J=2 at each count (off: a faster smoke test)

    def workload(self) -> dict[str, str]:
        """The settings both sides read (rl-swarm's workers and TRL's processes build one SwarmConfig from them)."""
        env = {"RL_SWARM_CACHE": str(self.cache), "MODEL_NAME": self.model, "SEED": "42",
               "NUM_GENERATIONS": "4", "NUM_TRAIN_SAMPLES": str(LIKE_FOR_LIKE[0]),
               "NUM_TRANSPLANT_TREES": str(LIKE_FOR_LIKE[1]), "MAX_NEW_TOKENS": "256", "TEMPERATURE": "1.0",
               "KL_BETA": "0", "STEPS_PER_ROUND": "1", "FORMAT_REWARD": "0", "LOSS_NORMALIZATION": "token",
               "ADVANTAGE_SCALE": "std", "EVAL_EVERY": "0", "EVAL_SIZE": "100", "CHECKPOINT_INTERVAL": "100000",
               "TASKS": "chain_sum:1,basic_arithmetic:1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        if self.quick:
            env.update(MAX_NEW_TOKENS="32", EVAL_SIZE="8", WARMUP_STEPS="2", WARMUP_BATCH_SIZE="8", DEVICE="cpu")
        return env


class PeakMemory:
    """Each watched process's (and its children's) most memory: GPU by NVML, or RSS where there is no GPU."""

    def __init__(self) -> None:
        self.monitor = Monitor()
        self.source = "nvml" if self.monitor.gpu_available() else "rss"
        self.roots: list[int] = []
        self.skip: set[int] = set()         # a supervisor: it holds no model, its workers do
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def watch(self, pid: int, count_itself: bool = True) -> None:
        self.roots.append(pid)
        if not count_itself:
            self.skip.add(pid)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _pids(self) -> list[int]:
        pids = []
        for root in list(self.roots):
            try:
                pids += [root] + [child.pid for child in psutil.Process(root).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return [pid for pid in pids if pid not in self.skip]

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            for pid, proc in self.monitor.sample(self._pids()).processes.items():
                mib = proc.gpu_mib if self.source == "nvml" else proc.rss_mib
                if mib:
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), mib)

    def peak_gib(self) -> float | None:
        return round(max(self.peaks.values()) / 1024, 3) if self.peaks else None


def add_peers_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers-updates", type=int, default=50, help="peers: measured updates alone and at the "
                        "first --peers-procs count (its held-out accuracy)")
    parser.add_argument("--peers-many-updates", type=int, default=25, help="peers: at the later counts")
    parser.add_argument("--peers-warmup", type=int, default=3, help="peers: updates before the measured ones")
    parser.add_argument("--peers-procs", default="4,8", help="peers: processes at once, comma-separated")
    parser.add_argument("--peers-seconds", type=float, default=470, help="peers: its whole budget; later phases "
                        "are cut or skipped past it")
    parser.add_argument("--peers-quick", action="store_true", help="peers: the CPU smoke run (tiny model, "
                        "32 new tokens, 8 held-out questions)")


def peers_plan(args: argparse.Namespace, cache: Path) -> PeersPlan:
    model = "rl-swarm/tiny-gpt2" if args.peers_quick else MODEL
    return PeersPlan(model=model, work=Path(tempfile.mkdtemp(prefix="peers-")), cache=cache,
                     updates=args.peers_updates, many_updates=args.peers_many_updates,
                     warmup_updates=args.peers_warmup, counts=tuple(int(n) for n in args.peers_procs.split(",")),
                     deadline=time.time() + args.peers_seconds, quick=args.peers_quick)


def _wait(proc: subprocess.Popen, deadline: float, what: str) -> None:
    """Until `proc` exits; past the deadline it is asked to stop (SIGINT: a swarm saves and leaves), then killed."""
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
        return
    except subprocess.TimeoutExpired:
        print(f"peers: {what} still running at the deadline: stopping it", flush=True)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def make_base(plan: PeersPlan, drive: Path) -> Path:
    """`rl-swarm pretrain`: the warmed-up base both sides start from."""
    env = {**os.environ, **plan.workload(), "GDRIVE_PATH": str(drive), "EXPERIMENT_NAME": "peers-base"}
    with open(plan.work / "pretrain.log", "w") as log:
        subprocess.run([sys.executable, "-m", "swarm_supervisor", "pretrain"], env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True, timeout=max(60.0, plan.deadline - time.time()))
    return drive / "experiments" / "peers-base"


def _walls(starts: dict[int, float], finished_at: float | None, total: int, skip: int) -> list[float]:
    """Seconds of each round after the first `skip`: round r runs from its state's start to round r+1's (or the
    finish)."""
    ends = {**{r - 1: t for r, t in starts.items()}, **({total: finished_at} if finished_at else {})}
    return [ends[r] - starts[r] for r in sorted(starts) if r > skip and r in ends]


def run_swarm(plan: PeersPlan, drive: Path, base: Path, workers: int, split: tuple[int, int],
              measured: int, profile: bool = False) -> dict:
    """`rl-swarm up` of `workers` workers at split (I, J) for warm-up + `measured` rounds; with `profile`, the
    first measured round under torch.profiler (PROFILE_ROUND), its table kept as "profile"."""
    name = f"swarm-n{workers}-i{split[0]}-j{split[1]}"
    exp = drive / "experiments" / name
    total = plan.warmup_updates + measured
    env = {**os.environ, **plan.workload(), "GDRIVE_PATH": str(drive), "EXPERIMENT_NAME": name,
           "NUM_WORKERS": str(workers), "NUM_TRAIN_SAMPLES": str(split[0]), "NUM_TRANSPLANT_TREES": str(split[1]),
           "MAX_ROUNDS": str(total), "PROFILE_ROUND": str(plan.warmup_updates + 1 if profile else 0)}
    # signed again for this swarm's coordinator: a base signed by another experiment's would be warmed up over
    copy_base(SwarmConfig.from_env({**env, "EXPERIMENT_NAME": base.name}), SwarmConfig.from_env(env))
    with PeakMemory() as memory, open(plan.work / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        memory.watch(proc.pid, count_itself=False)
        _wait(proc, plan.deadline, name)
    folder = ExperimentFolder(exp)
    try:
        finished_at = read_json_bounded(folder.finished_file)["finished_at"]
    except (OSError, ValueError, KeyError):
        finished_at = None
    walls = _walls(round_starts(folder), finished_at, total, plan.warmup_updates)
    if not walls:
        return {"error": f"no measured round; exit code {proc.returncode}, see {plan.work / (name + '.log')}"}
    keyring = KeyRing.for_viewing(folder, SwarmConfig.from_env(env).cache_dir)
    evals = {node: read_held_out(folder.eval_file(node), keyring)[0]
             for node in (f"worker-{i}" for i in range(1, workers + 1))}
    final = [rows[-1] for rows in evals.values() if rows and rows[-1].round > 0]
    start = [rows[0].accuracy for rows in evals.values() if rows and rows[0].round == 0]
    seconds = median(walls)
    return {"processes": workers, "split": list(split), "rounds": len(walls) + plan.warmup_updates,
            "measured_updates": len(walls), "median_seconds_per_update": seconds,
            "completions_per_s": workers * split[0] * 4 / seconds, "updates_per_s": workers / seconds,
            "peak_gib_per_process": memory.peak_gib(), "memory_source": memory.source,
            "held_out": [r.accuracy for r in final], "held_out_updates": [r.round for r in final],
            "held_out_start": start[0] if start else None, "exit_code": proc.returncode,
            **({"profile": read_profile(folder.log_dir("worker-1") / f"profile-round-{plan.warmup_updates + 1}.txt")}
               if profile else {})}


def read_profile(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        return f"no profile: {exc}"


def run_trl(plan: PeersPlan, drive: Path, base: Path, processes: int, measured: int, profile: bool = False) -> dict:
    """`processes` independent GRPOTrainer processes at once, process k on rl-swarm worker k's questions; with
    `profile`, process 0's first measured update under torch.profiler, its table kept as "profile"."""
    name = f"trl-n{processes}"
    outs, procs = [], []
    with PeakMemory() as memory:
        for index in range(processes):
            spec = {"env": {**plan.workload(), "GDRIVE_PATH": str(drive)}, "model": plan.model,
                    "base_experiment": str(base), "index": index, "seed": 42 + index,
                    "updates": plan.warmup_updates + measured, "warmup_updates": plan.warmup_updates,
                    "deadline": plan.deadline - STOP_MARGIN, "work_dir": str(plan.work / f"{name}-{index}"),
                    "threads": max(1, (os.cpu_count() or 1) // processes),
                    **({"profile_step": plan.warmup_updates + 1, "profile_out": str(plan.work / f"{name}.profile.txt")}
                       if profile and index == 0 else {})}
            spec_file, out = plan.work / f"{name}-{index}.spec.json", plan.work / f"{name}-{index}.out.json"
            spec_file.write_text(json.dumps(spec))
            log = open(plan.work / f"{name}-{index}.log", "w")      # noqa: SIM115 - closed below, after the wait
            procs.append((subprocess.Popen([sys.executable, "-m", "bench.peers_trl", str(spec_file), str(out)],
                                           env={**os.environ, **plan.workload()}, stdout=log,
                                           stderr=subprocess.STDOUT), log))
            memory.watch(procs[-1][0].pid)
            outs.append(out)
        for proc, log in procs:
            _wait(proc, plan.deadline, name)
            log.close()
    rows = [json.loads(out.read_text()) for out in outs if out.exists()]
    if len(rows) < processes:
        return {"error": f"{processes - len(rows)} of {processes} TRL processes wrote no result; see "
                         f"{plan.work}/{name}-*.log"}
    profiled = {"profile": read_profile(plan.work / f"{name}.profile.txt")} if profile else {}
    seconds = [r["median_seconds_per_update"] for r in rows]
    if None in seconds:         # stopped by the deadline before a measured update: the phase measured nothing
        return {"error": f"{seconds.count(None)} of {processes} TRL processes reached the deadline before a "
                         f"measured update; see {plan.work}/{name}-*.log", **profiled}
    return {"processes": processes, "rounds": min(r["updates"] for r in rows),
            "measured_updates": min(r["measured_updates"] for r in rows),
            "median_seconds_per_update": median(seconds),
            "completions_per_s": sum(r["completions_per_update"] / s for r, s in zip(rows, seconds)),
            "updates_per_s": sum(1 / s for s in seconds), "peak_gib_per_process": memory.peak_gib(),
            "memory_source": memory.source, "held_out": [r["held_out"] for r in rows],
            "held_out_updates": [r["updates"] for r in rows],
            "torch_peak_gib": max((r["torch_peak_gib"] or 0) for r in rows) or None, **profiled}


def _many(runs: dict[int, dict], held_out_count: int) -> dict:
    """Aggregate completions per second by process count, held-out accuracy of the first count's processes."""
    held = runs.get(held_out_count, {})
    return {"completions_per_s": {str(n): run.get("completions_per_s") for n, run in runs.items()},
            "held_out": {"mean": mean(held["held_out"]) if held.get("held_out") else None,
                         "per_seed": held.get("held_out"), "updates": held.get("held_out_updates")},
            "runs": {str(n): run for n, run in runs.items()}}


def _side(alone: dict, runs: dict[int, dict], held_out_count: int) -> dict:
    """The four measures of one side, from its runs (the raw runs kept beside them)."""
    many = _many(runs, held_out_count)
    return {"seconds_per_update": alone.get("median_seconds_per_update"),
            "measured_updates": alone.get("measured_updates"),
            "peak_gib_per_process": alone.get("peak_gib_per_process"), "memory_source": alone.get("memory_source"),
            **many, "runs": {"alone": alone, **many["runs"]}}


def bench_peers(plan: PeersPlan, on_progress: Callable[[dict], None] = lambda _: None) -> dict:
    """Every phase in turn; `on_progress` gets the results so far after each (a cut run keeps what it measured)."""
    plan.work.mkdir(parents=True, exist_ok=True)
    drive = plan.work / "drive"
    out: dict = {"plan": {"model": plan.model, "updates": plan.updates, "many_updates": plan.many_updates,
                          "warmup_updates": plan.warmup_updates, "processes": list(plan.counts)},
                 "workload": plan.workload()}
    started = time.monotonic()
    base = make_base(plan, drive)
    out["base_seconds"] = round(time.monotonic() - started, 1)
    trl_runs: dict[int, dict] = {}
    swarm_runs: dict[int, dict] = {}
    swarm_default: dict[int, dict] = {}

    def phase(what: str, run: Callable[[], dict]) -> dict:
        if time.time() > plan.deadline - STOP_MARGIN:
            return {"error": f"{what}: not run, the bench's time was spent"}
        began = time.monotonic()
        result = {**run(), "wall_s": round(time.monotonic() - began, 1)}
        print(f"peers {what}: {json.dumps({k: v for k, v in result.items() if k != 'held_out'})[:300]}", flush=True)
        return result

    swarm_alone = phase("rl-swarm alone", lambda: run_swarm(plan, drive, base, 1, LIKE_FOR_LIKE, plan.updates,
                                                            profile=True))
    trl_alone = phase("TRL alone", lambda: run_trl(plan, drive, base, 1, plan.updates, profile=True))
    out["profile"] = {"trl": trl_alone.pop("profile", None), "rl_swarm": swarm_alone.pop("profile", None)}
    for i, n in enumerate(plan.counts):
        measured = plan.updates if i == 0 else plan.many_updates
        swarm_runs[n] = phase(f"rl-swarm x{n}",
                              lambda n=n, m=measured: run_swarm(plan, drive, base, n, LIKE_FOR_LIKE, m))
        trl_runs[n] = phase(f"TRL x{n}", lambda n=n, m=measured: run_trl(plan, drive, base, n, m))
        if plan.default_split:      # last: the like-for-like pair decides the targets, should time run short
            swarm_default[n] = phase(f"rl-swarm x{n} J=2",
                                     lambda n=n, m=measured: run_swarm(plan, drive, base, n, DEFAULT_SPLIT, m))
        out["trl"] = _side(trl_alone, trl_runs, plan.counts[0])
        out["rl_swarm"] = _side(swarm_alone, swarm_runs, plan.counts[0])
        out["rl_swarm"]["default_j2"] = _many(swarm_default, plan.counts[0])
        out["held_out_start"] = swarm_alone.get("held_out_start")
        on_progress(out)
    for key in ("trl", "rl_swarm"):
        out.setdefault(key, _side(trl_alone if key == "trl" else swarm_alone, {}, 0))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def peers_rows(p: dict) -> list[tuple[str, float | None, float | None, float | None, str]]:
    """(measure, TRL, rl-swarm, rl-swarm's advantage, target) for the table and the verdicts."""
    trl, swarm = p.get("trl", {}), p.get("rl_swarm", {})
    j2 = swarm.get("default_j2", {})
    rows = [("seconds per update, one process alone (median; ratio TRL / rl-swarm)", trl.get("seconds_per_update"),
             swarm.get("seconds_per_update"), _ratio(trl.get("seconds_per_update"), swarm.get("seconds_per_update")),
             ">= 3x"),
            (f"peak memory per process, GiB ({swarm.get('memory_source', 'nvml')}; ratio rl-swarm / TRL)",
             trl.get("peak_gib_per_process"), swarm.get("peak_gib_per_process"),
             _ratio(swarm.get("peak_gib_per_process"), trl.get("peak_gib_per_process")), "<= 0.5x")]
    counts = list(swarm.get("completions_per_s", {}))
    for n in counts:
        target = ">= 3x" if n == counts[-1] else ""
        ours, theirs = swarm["completions_per_s"][n], trl.get("completions_per_s", {}).get(n)
        rows.append((f"completions/s, {n} processes (rl-swarm I=4, J=0)", theirs, ours, _ratio(ours, theirs), target))
        default = j2.get("completions_per_s", {}).get(n)
        rows.append((f"completions/s, {n} processes (rl-swarm default I=2, J=2)", theirs, default,
                     _ratio(default, theirs), ""))
    held = (trl.get("held_out", {}).get("mean"), swarm.get("held_out", {}).get("mean"),
            j2.get("held_out", {}).get("mean"))
    rows.append(("held-out exact-match (rl-swarm I=4, J=0)", held[0], held[1],
                 None if None in held[:2] else held[1] - held[0], "no worse"))
    rows.append(("held-out exact-match (rl-swarm default I=2, J=2)", held[0], held[2],
                 None if held[0] is None or held[2] is None else held[2] - held[0], ""))
    return rows


def peers_lines(p: dict) -> list[str]:
    """RESULTS.md's section: the table, then a line per target."""
    plan, trl = p.get("plan", {}), p.get("trl", {})
    updates = sorted(set(trl.get("held_out", {}).get("updates") or []))
    lines = [f"- {plan.get('model')}, one warmed-up base (held-out {_fmt(p.get('held_out_start'), '.2f')} before "
             f"RL); G=4, 16 completions an update, max {p.get('workload', {}).get('MAX_NEW_TOKENS')} new tokens, "
             f"T=1.0, beta 0, clip 0.2/0.28; medians over {plan.get('updates')} updates after "
             f"{plan.get('warmup_updates')} (the later process counts: {plan.get('many_updates')}); held-out after "
             f"{', '.join(map(str, updates)) or '-'} updates, one process per seed; settings in bench/PEERS.md", "",
             "| measure | TRL GRPOTrainer | rl-swarm | rl-swarm vs TRL | target |", "|---|---|---|---|---|"]
    for name, theirs, ours, advantage, target in peers_rows(p):
        spec = ".3f" if "exact-match" in name or "seconds" in name else ".2f" if "memory" in name else ".1f"
        shown = (_fmt(advantage, "+.3f") if "exact-match" in name else
                 "-" if advantage is None else f"{advantage:.2f}x")
        lines.append(f"| {name} | {_fmt(theirs, spec)} | {_fmt(ours, spec)} | {shown} | {target} |")
    return lines + [""] + [f"- {line}" for line in peers_verdicts(p)]


def peers_verdicts(p: dict) -> list[str]:
    """Issue 20's targets: met or missed, with the number that decides it."""
    out = []
    for name, _, _, advantage, target in peers_rows(p):
        if not target or advantage is None:
            continue
        met = advantage >= -1e-9 if target == "no worse" else (advantage <= 0.5 if target == "<= 0.5x"
                                                               else advantage >= 3)
        value = f"{advantage:+.3f}" if target == "no worse" else f"{advantage:.2f}x"
        out.append(f"{'met' if met else '**missed**'}: {name}: {value} (target {target})")
    return out
