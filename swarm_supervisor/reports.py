"""Read-only views of the shared folder for the CLI: status, validate, experiments list/compare/aggregate/plot,
and the summary a run prints at its end.

Every string read from the folder (names, config values, statuses) is printed through swarm_supervisor.readable:
escaped, never read as markup, and whole at any width.
"""

import contextlib
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from configs_env import SwarmConfig
from swarm_supervisor.readable import plain
from workers.shared_folder.rejections import FolderError

NAMED = 5       # experiments, or warnings of none, named in the one line that tells of the files skipped


def show_status(cfg: SwarmConfig) -> int:
    from rich.console import Console

    from swarm_supervisor.dashboard import render
    from swarm_supervisor.machines import read_events
    from swarm_supervisor.status import folder_reader

    reader = folder_reader(cfg)
    Console().print(render(reader.view(events=read_events(reader.folder)), whole=True))
    return 0


def run_validate(cfg: SwarmConfig, name: str) -> int:
    from swarm_supervisor.listing import experiment_folder
    from swarm_supervisor.validation import format_checks, validate

    checks = validate(experiment_folder(cfg, name).root, cfg.cache_dir)
    print(format_checks(name, checks))
    return 0 if all(c.passed for c in checks) else 1


def show_experiments(cfg: SwarmConfig, action: str, names: list[str], as_csv: bool, out: Path | None = None) -> int:
    from configs_env.parsing import safe_name
    from swarm_supervisor.listing import list_experiments

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
    with skipped_files_told_once(roots):
        return _show(cfg, roots, action, as_csv, out)


def _show(cfg: SwarmConfig, roots: list[Path], action: str, as_csv: bool, out: Path | None) -> int:
    from rich.console import Console

    from swarm_supervisor.experiments import summaries_csv, summarize
    from swarm_supervisor.readable import FittedTable, cell

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


class SkippedFiles(logging.Handler):
    """The readers' warnings (a bad file, a bad line) while experiments are read, counted by the experiment whose
    path they name: every experiment's every bad file was a line on stderr, some of them not saying whose."""

    def __init__(self, roots: list[Path]):
        super().__init__(logging.WARNING)
        self.roots = roots
        self.by_experiment: Counter[str] = Counter()
        self.others: list[str] = []         # warnings that name no experiment: the first NAMED, counted past them
        self.more_others = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        whose = next((root.name for root in self.roots if f"{root}/" in text), None)
        if whose is not None:
            self.by_experiment[whose] += 1
        elif len(self.others) < NAMED:
            self.others.append(text)
        else:
            self.more_others += 1

    def told(self) -> list[str]:
        """One line for the experiments' files, the warnings of none as they are; [] when there were none."""
        lines = [plain(f"rl-swarm: {text}") for text in self.others]
        if self.more_others:
            lines.append(f"rl-swarm: and {self.more_others} more warnings")
        if self.by_experiment:
            named = ", ".join(f"{name} {count}" for name, count in self.by_experiment.most_common(NAMED))
            more = len(self.by_experiment) - NAMED
            lines.append(plain(f"rl-swarm: unreadable files or lines skipped, by experiment: {named}"
                               + (f" and {more} more experiments" if more > 0 else "")
                               + " (`rl-swarm validate <experiment>` names them)"))
        return lines


@contextlib.contextmanager
def skipped_files_told_once(roots: list[Path]) -> Iterator[None]:
    """The warnings of reading `roots` said in a line at the end, on stderr, instead of a line each."""
    handler = SkippedFiles(roots)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        for line in handler.told():
            print(line, file=sys.stderr)


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
    from swarm_supervisor.endings import endings

    view = supervisor.reader.view(supervisor.handles)
    verdict = {0: "finished", 130: "stopped (resumable: run the same command again)"}.get(code, "FAILED")
    if code not in (0, 130) and supervisor.failure:
        verdict += f" ({supervisor.failure})"
    lines = [f"rl-swarm: {verdict}: experiment {view.experiment!r}, round {view.round}/{view.max_rounds}, "
             f"{wall_s:.1f}s, folder {supervisor.folder.root}"]
    lines += [plain(f"  {ended.words()}, {ended.numbers()}") for ended in endings(list(view.nodes))]
    unwritten = list(supervisor.journal.waiting)
    if unwritten:       # the shared folder was still away at the end: they are nowhere else
        lines.append(f"rl-swarm: {len(unwritten)} events not written to {supervisor.journal.path} (the shared "
                     "folder is away):")
        lines += [plain(f"  {time.strftime('%H:%M:%S', time.localtime(row['time']))} {row['event']}")
                  for row in unwritten[-20:]]
    return "\n".join(lines)
