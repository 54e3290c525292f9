"""Where a swarm's round goes, read from an experiment folder after the run: wall seconds per round, the slowest
worker's own work, and the hops in between.

A round's wall time (one round state to the next) is the slowest worker's round plus the hand-offs around it. Each
worker's metrics row splits its round into generate, score, fetch (publishing its rollouts, then waiting for and
re-scoring the peers') and train; what is left of the wall time is the hand-off between rounds (the coordinator
seeing every worker done, writing the next state, and the workers seeing it).
"""

import json
from pathlib import Path
from statistics import mean, median

from swarm_supervisor.experiments import experiment_config, metrics_by_round
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.held_out import read_held_out
from workers.shared_folder.json_records import read_json_bounded
from workers.shared_folder.protocol import RoundState
from workers.shared_folder.signing import KeyRing

SKIP_ROUNDS = 2         # the first rounds include the workers' start-up


def round_starts(folder: ExperimentFolder) -> dict[int, float]:
    """Each round's start time, from the coordinator's round states."""
    starts = {}
    for round_ in folder.state_rounds():
        try:
            starts[round_] = RoundState.from_json(read_json_bounded(folder.round_state_file(round_))).started_at
        except (OSError, ValueError):
            continue
    return starts


def saves_or_evaluates(round_: int, settings: dict) -> bool:
    """Whether the workers end `round_` with a held-out evaluation or a checkpoint (config.json's settings)."""
    return any(isinstance(every, int) and every > 0 and round_ % every == 0
               for every in (settings.get("eval_every"), settings.get("checkpoint_interval")))


def swarm_timing(experiment_dir: Path) -> dict:
    """Seconds per round, the slowest worker's own work per round, and the mean of each hop (after start-up); the
    same for the quiet rounds alone, those that end in neither a held-out evaluation nor a checkpoint."""
    folder = ExperimentFolder(experiment_dir)
    starts = round_starts(folder)
    keyring = KeyRing.for_viewing(folder, None)
    by_round, _ = metrics_by_round(folder, keyring)     # the bench's own, made just now
    rounds = sorted(r for r in by_round if r > SKIP_ROUNDS and r + 1 in starts and r in starts)
    if len(rounds) < 2:
        return {"error": f"{experiment_dir}: fewer than {SKIP_ROUNDS + 3} finished rounds"}
    walls = [starts[r + 1] - starts[r] for r in rounds]
    rows = [row for r in rounds for row in by_round[r].values()]
    slowest = [max(by_round[r].values(), key=lambda m: m.round_s) for r in rounds]

    def work(m) -> float:
        return m.generate_s + (m.score_s or 0.0) + m.train_s

    hops = {"generate_s": mean(m.generate_s for m in rows), "score_s": mean((m.score_s or 0.0) for m in rows),
            "fetch_s": mean(m.fetch_s for m in rows), "train_s": mean(m.train_s for m in rows),
            "worker_round_s": mean(m.round_s for m in rows),
            "slowest_worker_round_s": mean(m.round_s for m in slowest)}
    hops["between_rounds_s"] = mean(walls) - hops["slowest_worker_round_s"]
    # the typical hand-off, without the rounds that end in a held-out evaluation or a checkpoint's snapshot
    # (every EVAL_EVERY and CHECKPOINT_INTERVAL rounds), which the mean spreads over all rounds
    hops["between_rounds_median_s"] = median(wall - m.round_s for wall, m in zip(walls, slowest))
    settings = experiment_config(folder, keyring)
    quiet = [i for i, r in enumerate(rounds) if not saves_or_evaluates(r, settings)]
    if quiet:
        hops["between_quiet_rounds_s"] = mean(walls[i] - slowest[i].round_s for i in quiet)
    return {"rounds": len(rounds), "workers": len({m.node for m in rows}),
            "seconds_per_round": mean(walls), "median_seconds_per_round": median(walls),
            "worker_work_seconds": mean(max(work(m) for m in by_round[r].values()) for r in rounds),
            **({"quiet_rounds": len(quiet), "seconds_per_quiet_round": mean(walls[i] for i in quiet),
                "quiet_worker_work_seconds": mean(max(work(m) for m in by_round[rounds[i]].values()) for i in quiet)}
               if quiet else {}),
            "hops": {k: round(v, 4) for k, v in hops.items()},
            "held_out": held_out_timing(folder, keyring, sorted({m.node for m in rows})),
            "peak_gib_per_worker": nvml_peak_gib(folder)}


def held_out_timing(folder: ExperimentFolder, keyring: KeyRing, nodes: list[str]) -> dict | None:
    """The workers' held-out evaluations: how many, their mean seconds, and what their answers looked like (a
    batch of greedy answers runs as long as its longest: cut-off answers ran MAX_NEW_TOKENS)."""
    rows = [row for node in nodes for row in read_held_out(folder.eval_file(node), keyring)[0]]
    if not rows:
        return None
    measured = [row for row in rows if row.mean_tokens is not None and row.cut_off is not None]
    return {"evaluations": len(rows), "questions": max(row.questions for row in rows),
            "seconds": round(mean(row.seconds for row in rows), 4),
            "mean_tokens": round(mean(row.mean_tokens for row in measured), 2) if measured else None,
            "cut_off": round(mean(row.cut_off for row in measured), 2) if measured else None}


def nvml_peak_gib(folder: ExperimentFolder) -> float | None:
    """The most GPU memory any worker process held, by the supervisor's NVML samples (CUDA context included)."""
    try:
        lines = folder.monitor_file.read_text().splitlines()
    except OSError:
        return None
    peak = 0.0
    for line in lines:
        try:
            sample = json.loads(line)
            peak = max([peak] + [(v.get("gpu_mib") or 0) for v in sample["nodes"].values()])
        except (ValueError, KeyError, AttributeError, TypeError):
            continue
    return round(peak / 1024, 3) if peak else None


def concurrent_timing(experiment_dirs: list[Path]) -> dict:
    """Swarms that ran side by side (the SAPO table's splits): each one's timing and their mean seconds per round."""
    each = {Path(d).name: swarm_timing(Path(d)) for d in experiment_dirs}
    good = [t for t in each.values() if "error" not in t]
    return {"swarms": len(each), "workers": sum(t["workers"] for t in good),
            "seconds_per_round": mean(t["seconds_per_round"] for t in good) if good else None,
            "worker_work_seconds": mean(t["worker_work_seconds"] for t in good) if good else None,
            "peak_gib_per_worker": max((t["peak_gib_per_worker"] or 0 for t in good), default=None),
            "per_swarm": each}
