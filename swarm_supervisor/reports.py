"""Read-only views of the shared folder for the CLI: status, validate, experiments list/compare/aggregate/plot,
and the summary a run prints at its end.

Every string read from the folder (names, config values, statuses) is printed through swarm_supervisor.readable:
escaped, never read as markup, and whole at any width.
"""

import sys
import time
from pathlib import Path

from configs_env import SwarmConfig
from swarm_supervisor.readable import plain
from workers.shared_folder.rejections import FolderError


def show_status(cfg: SwarmConfig) -> int:
    from rich.console import Console

    from swarm_supervisor.dashboard import render
    from swarm_supervisor.machines import read_events
    from swarm_supervisor.status import folder_reader

    reader = folder_reader(cfg)
    Console().print(render(reader.view(events=read_events(reader.folder)), whole=True))
    return 0


def run_validate(cfg: SwarmConfig, name: str) -> int:
    from swarm_supervisor.experiments import experiment_folder
    from swarm_supervisor.validation import format_checks, validate

    checks = validate(experiment_folder(cfg, name).root, cfg.cache_dir)
    print(format_checks(name, checks))
    return 0 if all(c.passed for c in checks) else 1


def show_experiments(cfg: SwarmConfig, action: str, names: list[str], as_csv: bool, out: Path | None = None) -> int:
    from rich.console import Console

    from configs_env.parsing import safe_name
    from swarm_supervisor.experiments import list_experiments, summaries_csv, summarize
    from swarm_supervisor.readable import FittedTable, cell, plain

    listing = list_experiments(cfg)
    roots = listing.roots
    if names:
        wanted = [safe_name("experiment", n) for n in names]
        missing = [name for name in dict.fromkeys(wanted) if name not in {r.name for r in roots}]
        if missing:
            raise listing.unknown(missing)
        roots = [r for r in roots if r.name in wanted]
    elif not roots:         # a wrong GDRIVE_PATH (or SWARM_URL) is said, not shown as an empty table
        if listing.why_none or action == "plot":
            raise FolderError(listing.none_found())
        print(f"rl-swarm: {plain(listing.none_found())}", file=sys.stderr)
        return 0
    if listing.empty and not names:
        print(f"rl-swarm: {plain(listing.empty_note().removeprefix('; '))}", file=sys.stderr)
    if action == "plot":
        from swarm_supervisor.experiments import plot_experiments

        target = out or cfg.gdrive_path / "plots" / ("-".join(r.name for r in roots)[:100] + ".png")
        print(f"rl-swarm: plot saved to {plain(plot_experiments(roots, target, cfg.cache_dir))}")
        return 0
    if action == "aggregate":
        return show_aggregate(roots, cfg.cache_dir)
    summaries = [summarize(r, cfg.cache_dir) for r in roots]
    if as_csv:
        print(summaries_csv(summaries), end="")
        return 0
    columns = ("name", "status", "rounds", "nodes", "split", "model", "started", "last activity") if action == "list" \
        else ("name", "split", "rounds", "cumulative reward", "final acc", "held-out start -> end (best)", "rounds/h",
              "restarts", "rejected")
    rows = []
    for s in summaries:
        if action == "list":
            values = (s.name, s.status, f"{s.rounds}/{s.max_rounds}", s.nodes, s.split, s.model, s.started,
                      s.last_activity)
        else:
            values = (s.name, s.split, f"{s.rounds}/{s.max_rounds}", f"{s.cumulative_reward:.3f}",
                      "-" if s.final_accuracy is None else f"{s.final_accuracy:.1%}",
                      " -> ".join("-" if v is None else f"{v:.1%}" for v in (s.held_out_start, s.held_out_final))
                      + ("" if s.held_out_best is None else f" ({s.held_out_best:.1%})"),
                      "-" if s.rounds_per_hour is None else f"{s.rounds_per_hour:.0f}", s.restarts, s.rejected_files)
        rows.append([cell(value) for value in values])
    Console().print(FittedTable(columns, rows))
    return 0


def show_aggregate(roots: list[Path], cache_dir: Path) -> int:
    from swarm_supervisor.experiments import aggregate
    from swarm_supervisor.readable import plain

    def shown(value: tuple[float, float | None] | None, percent: bool = False) -> str:
        if value is None:
            return "-"
        mean, half = value
        fmt = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:.3f}")
        return fmt(mean) + ("" if half is None else f" ± {fmt(half)}")

    for row in aggregate(roots, cache_dir):
        print(plain(f"{row.configuration}: {len(row.experiments)} run(s) ({', '.join(row.experiments)}): cumulative "
                    f"reward {shown(row.cumulative_reward)}, final accuracy {shown(row.final_accuracy, True)}, "
                    f"held-out accuracy {shown(row.held_out_final, True)} (95% interval)"))
    return 0


def summary(supervisor, wall_s: float, code: int) -> str:
    view = supervisor.reader.view(supervisor.handles)
    verdict = {0: "finished", 130: "stopped (resumable: run the same command again)"}.get(code, "FAILED")
    if code not in (0, 130) and supervisor.failure:
        verdict += f" ({supervisor.failure})"
    lines = [f"rl-swarm: {verdict}: experiment {view.experiment!r}, round {view.round}/{view.max_rounds}, "
             f"{wall_s:.1f}s, folder {supervisor.folder.root}"]
    for row in view.nodes:
        if row.role != "worker":
            continue
        reward = "-" if row.reward is None else f"{row.reward:.3f}"
        shown = [f"{v:.1%}" for v in (row.held_out_start, row.held_out) if v is not None]
        error = f" ({row.last_error})" if row.last_error else ""
        lines.append(plain(f"  {row.node_id}: {row.status}, round {row.round}, reward {reward}, held-out "
                           f"{' -> '.join(shown) or '-'}, restarts {row.restarts}{error}"))
    unwritten = list(supervisor.journal.waiting)
    if unwritten:       # the shared folder was still away at the end: they are nowhere else
        lines.append(f"rl-swarm: {len(unwritten)} events not written to {supervisor.journal.path} (the shared "
                     "folder is away):")
        lines += [plain(f"  {time.strftime('%H:%M:%S', time.localtime(row['time']))} {row['event']}")
                  for row in unwritten[-20:]]
    return "\n".join(lines)
