"""bench/RESULTS.md from bench/results.json: a section per part with the command that measured it, then each
target met or missed."""

from collections.abc import Callable

from bench.peers import peers_lines


def _swarm_lines(s: dict) -> list[str]:
    if "error" in s:
        return [f"failed: {s['error']}"]
    growth = 100 * (s["peak_gib_per_worker"] / s["peak_gib_by_round_10"] - 1) if s.get("peak_gib_by_round_10") else 0
    wall = (f"wall {s['wall_s']:.0f}s (warm-up and start-up included)" if s.get("wall_s") is not None
            else "wall not measured")
    return [*([f"- {s['note']}"] if s.get("note") else []), f"- rounds: {s['rounds']}, {wall}",
            f"- seconds per round: **{s['seconds_per_round']:.2f}** (target <= 1.8: 2000 rounds in "
            f"{2000 * s['seconds_per_round'] / 3600:.2f} h)",
            f"- peak GPU per worker (NVML, CUDA context included): **{s['peak_gib_per_worker']:.2f} GiB** "
            "(target <= 3); "
            f"by round 10: {s['peak_gib_by_round_10']:.2f} GiB (growth {growth:+.1f}%)",
            *([f"- torch allocator's peak (exact, every worker, CUDA context not included): "
               f"{s['torch_peak_gib_by_round_10']:.3f} GiB by round 10, {s['torch_peak_gib']:.3f} GiB by round "
               f"{s['rounds']} (growth {100 * (s['torch_peak_gib'] / s['torch_peak_gib_by_round_10'] - 1):+.1f}%)"]
              if s.get("torch_peak_gib") and s.get("torch_peak_gib_by_round_10") else []),
            *([f"- host RAM per worker, the most of any: {s['host_pss_gib_per_worker']:.2f} GiB by PSS (its share "
               f"of the pages it maps; RSS, which counts in full the libraries every worker maps: "
               f"{s['host_rss_gib_per_worker']:.2f} GiB)"] if s.get("host_pss_gib_per_worker") else []),
            f"- mean completion tokens: {s['mean_completion_tokens']:.1f}, mean reward of the last 5 rounds "
            f"(worker-1): {s['final_reward_mean']:.3f}", *_hop_lines(s)]


HOPS = (("generate_s", "generate (a worker's own completions)"), ("score_s", "score them"),
        ("fetch_s", "publish ours, wait for and re-score the peers' rollouts"), ("train_s", "train (the update)"),
        ("worker_round_s", "a worker's whole round"), ("slowest_worker_round_s", "the slowest worker's round"),
        ("between_rounds_s", "hand-off between rounds (wall minus the slowest worker's round)"),
        ("between_rounds_median_s", "the same, the median round's (rounds with an evaluation or a checkpoint are "
                                    "the outliers a mean spreads)"),
        ("between_quiet_rounds_s", "the same, the mean over rounds that end in neither a held-out evaluation nor a "
                                   "checkpoint"))


def _hop_lines(s: dict) -> list[str]:
    """A round, hop by hop: mean seconds over rounds and workers (start-up rounds left out)."""
    hops = s.get("hops")
    if not hops:
        return []
    lines = [f"- the slowest worker's own work (generate + score + train) per round: "
             f"{s['worker_work_seconds']:.3f} s; wall per round / that work: "
             f"**{s['seconds_per_round'] / s['worker_work_seconds']:.2f}** (target <= 1.5)",
             *([f"- the {s['quiet_rounds']} of {s['rounds']} rounds that end in neither a held-out evaluation nor a "
                f"checkpoint: {s['seconds_per_quiet_round']:.3f} s a round for {s['quiet_worker_work_seconds']:.3f} s "
                f"of work, wall / work {s['seconds_per_quiet_round'] / s['quiet_worker_work_seconds']:.2f}"]
               if s.get("quiet_rounds") else []),
             *([f"- held-out evaluations: {h['evaluations']} of {h['questions']} greedy answers, "
                f"{h['seconds']:.2f} s each"
                + (f"; answers of {h['mean_tokens']:.1f} tokens on average, {h['cut_off']:.1f} a time cut off at "
                   "MAX_NEW_TOKENS" if h.get("mean_tokens") is not None else "")]
               if (h := s.get("held_out")) else []), "",
             "| hop | mean seconds |", "|---|---|"]
    lines += [f"| {text} | {hops[key]:.3f} |" for key, text in HOPS if key in hops]
    return lines


Section = tuple[str, str, list[str]]      # (title, the part whose command measured it, its lines)


def _generation(results: dict) -> Section | None:
    if "generation" not in results:
        return None
    lines = ["| batch | plain `generate` tok/s | workers' fast path tok/s | speed-up (target >= 4x) |",
             "|---|---|---|---|"]
    for row in results["generation"]["rows"]:
        fast = row.get("fast_tok_s")
        lines.append(f"| {row['batch']} | {row['plain_tok_s']:.0f} | "
                     f"{'%.0f' % fast if fast else row.get('fast_error', '-')} | "
                     f"{'%.2fx' % (fast / row['plain_tok_s']) if fast else '-'} |")
    return "Generation (GPT-2 124M shapes, 256 new tokens, T=1.0, every row forced to 256 tokens)", "generation", lines


def _train(results: dict) -> Section | None:
    if "train" not in results:
        return None
    lines = ["| path | seconds | peak GiB allocated | peak GiB reserved (a CUDA graph's pool included) |",
             "|---|---|---|---|"]
    for key, row in results["train"].items():
        reserved = f"{row['peak_reserved_gib']:.2f}" if "peak_reserved_gib" in row else "-"
        lines.append(f"| {row.get('name', key)} | {row['seconds']:.4f} | {row['peak_gib']:.2f} | {reserved} |")
    return "Train step (16 rows x 256 completion tokens + 48 prompt tokens, bf16 autocast)", "train", lines


def _at(results: dict, part: str) -> str:
    """' at <commit>' of the run that measured `part`, from the command recorded for it; '' where none was."""
    command = results.get("commands", {}).get(part, "")
    sha = command.split("GIT_SHA=", 1)[1].split()[0] if "GIT_SHA=" in command else None
    return f" at {sha}" if sha else ""


def _reserved(row: dict) -> float:
    """A train row's peak GiB reserved, a graph's pool included (older results kept only the allocated peak)."""
    return row.get("peak_reserved_gib", row["peak_gib"])


def _worker_memory(results: dict) -> Section | None:
    w = results.get("worker_memory")
    if not w:
        return None
    return ("One worker's worst case by NVML (generate 8 x 256 tokens, update 16 x 256, 8 rounds)", "worker_memory",
            [f"- peak **{w['nvml_peak_gib']:.2f} GiB**, CUDA context included (target <= 3); by round: "
             + ", ".join(f"{x:.2f}" for x in w["nvml_peak_by_round"]),
             f"- the supervisor's pre-start estimate for it: {w['estimate_gib']:.2f} GiB"])


def _swarm_default(results: dict) -> Section | None:
    if "swarm_default" not in results:
        return None
    return ("Whole default swarm (`rl-swarm up`: 4 workers, I=2, J=2, G=4, max 256 new tokens, warmed-up base)",
            "swarm_default", _swarm_lines(results["swarm_default"]))


def _swarm_paper(results: dict) -> Section | None:
    if "swarm_paper" not in results:
        return None
    lines = _swarm_lines(results["swarm_paper"])
    released = results["swarm_paper"].get("decode_cache_release")
    if released:
        lines += ["", f"With `DECODE_CACHE=release` ({released['note']}): {released['seconds_per_round']:.2f} s "
                      f"per round, the slowest worker's work {released['worker_work_seconds']:.3f} s, peak GPU "
                      f"per worker (NVML) {released['peak_gib_per_worker']:.2f} GiB, the allocator's peak "
                      f"{released['torch_peak_gib']:.3f} GiB, over {released['rounds']} rounds"]
    return ("The paper's shape (`PRESET=paper-4-4`: 8 workers, G=8, I=4, J=4, max 128 new tokens, warmed-up base)",
            "swarm_paper", lines)


def _swarm_default_x3(results: dict) -> Section | None:
    x3 = results.get("swarm_default_x3")
    if not x3:
        return None
    hops = [(key, text) for key, text in HOPS if any(key in one["hops"] for one in x3["per_swarm"].values())]
    lines = [f"- {x3['note']}",
             f"- seconds per round, mean of the swarms: **{x3['seconds_per_round']:.3f}**; the slowest worker's "
             f"own work: {x3['worker_work_seconds']:.3f} s; wall / work: "
             f"**{x3['seconds_per_round'] / x3['worker_work_seconds']:.2f}** (target <= 1.5); peak GPU per "
             f"worker (NVML): {x3['peak_gib_per_worker']:.2f} GiB", "",
             "| swarm | rounds | s/round | " + " | ".join(text for _, text in hops) + " |",
             "|---|---|---|" + "---|" * len(hops)]
    for name, one in x3["per_swarm"].items():
        lines.append(f"| {name} | {one['rounds']} | {one['seconds_per_round']:.3f} | "
                     + " | ".join(f"{one['hops'].get(key, float('nan')):.3f}" for key, _ in hops) + " |")
    return (f"Default swarms side by side ({x3['swarms']} swarms, {x3['workers']} workers, {x3['device']}, "
            f"git {x3['git_sha']})", "swarm_default_x3", lines)


def _sapo_table(results: dict) -> Section | None:
    t = results.get("sapo_table")
    if not t or "error" in t:
        return None
    lines = [f"- seconds per round, mean over the splits and seeds: **{t['seconds_per_round']:.2f}** "
             f"(target <= 1.2); peak GPU per worker (NVML): {t['peak_gib_per_worker']:.2f} GiB", "",
             "| seed | split | seconds per round | slowest worker's work | hand-off between rounds |",
             "|---|---|---|---|---|"]
    for seed, batch in t["by_seed"].items():
        for name, one in batch["per_swarm"].items():
            if "error" not in one:
                lines.append(f"| {seed} | {name} | {one['seconds_per_round']:.2f} | "
                             f"{one['worker_work_seconds']:.3f} | {one['hops']['between_rounds_s']:.3f} |")
    return (f"Four paper swarms at once (`rl-swarm sapo-table`: {t['swarms_at_once']} swarms, "
            f"{t['workers_at_once']} workers)", "sapo_table", lines)


def _swarm_worst_case(results: dict) -> Section | None:
    if "swarm_worst_case" not in results:
        return None
    return ("Worst-case swarm (WARMUP_STEPS=0: a random-init model writes all 256 tokens every time)",
            "swarm_worst_case", _swarm_lines(results["swarm_worst_case"])
            + ["- every reward is 0 for a random-init model, so no update runs in these rounds: this row "
               "measures generation and the exchange at their longest"])


def _scaling(results: dict) -> Section | None:
    if "scaling" not in results:
        return None
    lines = ["| workers | aggregate tok/s | peak GiB per worker (torch reserved) |", "|---|---|---|"]
    lines += [f"| {row['workers']} | {row['tok_s']:.0f} | {row['peak_gib_per_worker']:.2f} |"
              for row in results["scaling"]]
    return "Scaling (N processes generating at once on one GPU, batch 16, 256 tokens, the fast path)", "scaling", lines


def _peers(results: dict) -> Section | None:
    if "peers" not in results:
        return None
    return "Side by side with TRL's GRPOTrainer (issue 20; bench/PEERS.md)", "peers", peers_lines(results["peers"])


SECTIONS = (_generation, _train, _worker_memory, _swarm_default, _swarm_paper, _swarm_default_x3, _sapo_table,
            _swarm_worst_case, _scaling, _peers)


def render(results: dict) -> str:
    """bench/RESULTS.md: a table per part, each with the command that measured it."""
    commands = results.get("commands", {})
    lines = [f"# Benchmarks ({results['device']}, {results['date']}, git {results['git_sha'][:10]}, "
             f"torch {results['torch']})", "",
             "Made by `GIT_SHA=<commit> python -m bench all --out bench/results.json` on the GPU machine "
             "(`--parts` splits it over device calls of at most 10 minutes; each section names its own run).", ""]
    sections = [section for make in SECTIONS if (section := make(results))]
    for i, (title, part, body) in enumerate(sections):
        lines += ([""] if i else []) + [f"## {title}", "", f"`{commands.get(part, 'python -m bench all')}`", ""] + body
    lines += ["", "## Against the targets (issues 8 and 18)", ""] + [f"- {line}" for line in verdicts(results)]
    return "\n".join(lines) + "\n"


def verdicts(results: dict) -> list[str]:
    """One line per target: met or missed, with the number that decides it."""
    out: list[str] = []

    def say(met: bool, text: str) -> None:
        out.append(f"{'met' if met else '**missed**'}: {text}")

    _swarm_verdicts(results, say)
    _part_verdicts(results, say)
    return out


def _swarm_verdicts(results: dict, say: Callable[[bool, str], None]) -> None:
    """The whole swarms' targets: seconds per round, the hand-offs, memory over rounds."""
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
        if t.get("peak_gib_per_worker"):
            say(t["peak_gib_per_worker"] <= 3, f"paper swarms <= 3 GiB per worker (NVML), four at once: "
                f"{t['peak_gib_per_worker']:.2f} GiB")
    worst = results.get("swarm_worst_case", {})
    if "seconds_per_round" in worst:
        say(worst["seconds_per_round"] <= 1.0, f"worst case (every completion 256 tokens) <= 1.0 s per round: "
            f"{worst['seconds_per_round']:.2f} s")


def _part_verdicts(results: dict, say: Callable[[bool, str], None]) -> None:
    """The targets of one worker's parts: its memory, generation, the train step."""
    w = results.get("worker_memory")
    if w:
        # the most any default-shaped worker held: alone at its worst, in the default swarm, in the worst-case swarm
        # each measured at its own commit: said beside it
        peaks = {f"one worker's worst case{_at(results, 'worker_memory')}": w["nvml_peak_gib"]}
        for key, what in (("swarm_default", "the default swarm"), ("swarm_worst_case", "the worst-case swarm")):
            if results.get(key, {}).get("peak_gib_per_worker"):
                peaks[what + _at(results, key)] = results[key]["peak_gib_per_worker"]
        where, peak = max(peaks.items(), key=lambda item: item[1])
        say(peak <= 3, f"<= 3 GiB per worker by NVML: {peak:.2f} GiB, in {where} (" + ", ".join(
            f"{what} {gib:.2f}" for what, gib in peaks.items()) + f"); the pre-start estimate says "
            f"{w['estimate_gib']:.2f} GiB, so 16 workers need {16 * w['estimate_gib']:.0f} GiB of an 80 GB GPU")
    g = results.get("generation")
    if g:
        speedups = {row["batch"]: row["fast_tok_s"] / row["plain_tok_s"] for row in g["rows"] if row.get("fast_tok_s")}
        shown = ", ".join(f"{v:.2f}x at batch {b}" for b, v in speedups.items())
        say(bool(speedups) and min(speedups.values()) >= 4, f"generation >= 4x plain `generate`: {shown}")
    t = results.get("train")
    if t and "naive" in t:
        naive = t["naive"]
        for key in ("ours_graphs", "ours", "ours_fp32_adamw"):
            if key in t:
                row = t[key]
                say(row["seconds"] <= naive["seconds"] and _reserved(row) <= 0.5 * _reserved(naive),
                    f"train step at least as fast as full logits, in at most half its memory ({row['name']}): "
                    f"{row['seconds']:.3f} s vs {naive['seconds']:.3f} s, {_reserved(row):.2f} vs "
                    f"{_reserved(naive):.2f} GiB at peak")
