"""`rl-swarm validate`: is one experiment's folder complete and consistent? A PASS/FAIL line per check."""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from swarm_supervisor.experiments import held_out_by_node, metrics_by_round, setting_of
from swarm_supervisor.readable import plain
from workers.shared_folder import storage
from workers.shared_folder.base_meta import META_BYTES
from workers.shared_folder.exchange import ROLLOUT_NAME, SMALL_RECORD_BYTES, read_finished, signed_round_state
from workers.shared_folder.folder import ExperimentFolder, round_number
from workers.shared_folder.json_records import MAX_RECORD_BYTES, read_json_bounded
from workers.shared_folder.recorded_config import CONFIG_BYTES, read_recorded_config
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.safe_io import is_visible, list_folder
from workers.shared_folder.protocol import Heartbeat, RolloutFile, RoundMetrics, RoundState, SwarmFinished
from workers.shared_folder.signing import COORDINATOR, KeyRing


SHOWN = 3              # files, gaps or problems named in a check's line; the rest are counted
REASON_CHARS = 100     # of why a file is unreadable: its start says what is wrong


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def validate(root: Path, cache_dir: Path | None) -> list[Check]:
    """Completeness and consistency of one experiment's folder; each check is PASS or FAIL with a reason
    (`cache_dir`: where this machine keeps its keys; see KeyRing.for_viewing)."""
    folder = ExperimentFolder(root)
    keyring = KeyRing.for_viewing(folder, cache_dir)
    cfg, config_check = _config(folder, keyring)
    states = _signed_states(folder, keyring)
    rounds = sorted(states)
    missing_states = _missing_rounds(rounds)
    by_round, bad = metrics_by_round(folder, keyring)
    unreadable = _unreadable_files(folder, keyring)
    return [
        config_check,
        _round_states_check(rounds, missing_states),
        _readable_check(unreadable),
        Check("metrics lines", not bad, f"{len(bad)} bad: {listed(bad, 1)}" if bad else "every metrics line is valid"),
        _rounds_check(folder, cfg, states, by_round),
        _held_out_check(folder, keyring, cfg, rounds, by_round),
        _checkpoints_check(folder, cfg, by_round),
        _logs_check(folder, by_round),
    ]


def _config(folder: ExperimentFolder, keyring: KeyRing) -> tuple[dict, Check]:
    """The settings the coordinator signed in config.json ({} without them) and their check."""
    try:
        return read_recorded_config(folder, keyring), Check("config", True, "config.json signed by the coordinator")
    except RejectedFile as error:
        return {}, Check("config", False, str(error))
    except OSError as exc:
        return {}, Check("config", False, f"config.json missing or unreadable ({exc.strerror or exc})")


def _signed_states(folder: ExperimentFolder, keyring: KeyRing) -> dict[int, RoundState]:
    """The round states the coordinator signed, by round: a state file's name is anyone's to plant (a refused
    one is named by the readable-files check)."""
    states = {}
    for round_ in folder.state_rounds():
        try:
            state = signed_round_state(folder, keyring, round_)
        except OSError:     # a Drive hiccup: named by the readable-files check
            continue
        if state is not None:
            states[round_] = state
    return states


def _round_states_check(rounds: list[int], missing: list[int]) -> Check:
    if not rounds:
        return Check("round states", False, "no round state the coordinator signed")
    if missing:
        return Check("round states", False, f"no state the coordinator signed for rounds {missing}")
    return Check("round states", True, f"rounds 1..{rounds[-1]} each have a state the coordinator signed")


def _unreadable_files(folder: ExperimentFolder, keyring: KeyRing) -> list[tuple[Path, str]]:
    """JSON files of the layout that do not parse or validate, or (in an experiment of signed records) are not
    signed by the node they speak for (checkpoints and temp files aside): each its path in the experiment and why."""
    root, unreadable = folder.root, []
    for path in _layout_files(folder):
        # the swarm's protocol records must carry a checksum; meta files of the warm-up base need not
        top = path.relative_to(root).parts[0]
        protocol = top in ("state", "peers", "rollouts", "rewards")
        try:
            record = read_json_bounded(path, _reader_limit(folder, path), require_checksum=protocol)
            if protocol:
                record = keyring.verify(record, _speaks_for(top, path), str(path))
            schema = {"rollouts": RolloutFile, "peers": Heartbeat, "rewards": RoundMetrics}.get(top)
            if top == "state":
                schema = SwarmFinished if path.name == "finished.json" else RoundState
            if path == folder.coordinator_lease_file:
                schema = None
            if schema is not None:
                schema.from_json(record, str(path))
        except (RejectedFile, OSError) as exc:
            unreadable.append((path.relative_to(root), _reason(root, path, exc)))
    return unreadable


def _reader_limit(folder: ExperimentFolder, path: Path) -> int:
    """The bytes the swarm's own reader of `path` takes, so validate refuses a file for the size they refuse it."""
    if path.parent == folder.peers_dir or path in (folder.finished_file, folder.coordinator_lease_file):
        return SMALL_RECORD_BYTES
    if path == folder.config_file:
        return CONFIG_BYTES
    if path.parent == folder.base_dir:
        return META_BYTES
    return MAX_RECORD_BYTES


def _reason(root: Path, path: Path, error: Exception) -> str:
    """Why `path` was refused, read from its start: paths relative to the experiment, cut at the end."""
    text = str(error) if isinstance(error, RejectedFile) else (error.strerror or str(error))
    return shortened(text.removeprefix(f"{path}: ").removesuffix("; skipped").replace(f"{root}/", ""), REASON_CHARS)


def shortened(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most - 1] + "\u2026"


def listed(items: list[str], shown: int = SHOWN) -> str:
    """The first `shown` items, and how many more there are: a FAIL hides none of its count."""
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def _readable_check(unreadable: list[tuple[Path, str]]) -> Check:
    """The first few unreadable files, each with why, and the folders that hold the rest, the fullest first."""
    if not unreadable:
        return Check("readable files", True, "every JSON file parses and validates")
    detail = f"{len(unreadable)} unreadable: {listed([f'{path} ({why})' for path, why in unreadable])}"
    folders = Counter(f"{path.parent}/" for path, _ in unreadable[SHOWN:])
    if folders:
        detail += " in " + ", ".join(f"{name} ({count})" for name, count in folders.most_common(3)) + \
            (", ..." if len(folders) > 3 else "")
    return Check("readable files", False, detail)


def _speaks_for(top: str, path: Path) -> str:
    """The node a protocol file of the layout speaks for, by where it lies."""
    if top == "state":
        return COORDINATOR
    match = ROLLOUT_NAME.fullmatch(path.name) if top == "rollouts" else None
    return match["node"] if match else path.stem


def _rounds_check(folder: ExperimentFolder, cfg: dict, states: dict[int, RoundState],
                  by_round: dict[int, dict[str, RoundMetrics]]) -> Check:
    """Every worker that marked a round done published rollouts and a metrics row for it."""
    gaps = []
    for r, state in sorted(states.items()):
        done = {p.stem for p in list_folder(folder.rewards_dir(r), "*.json")}
        published = {match["node"] for p in list_folder(folder.rollout_dir(r), "*.json")
                     if (match := ROLLOUT_NAME.fullmatch(p.name))}
        for node in sorted(set(state.nodes) & done):
            if node not in published and cfg.get("num_train_samples", 1):
                gaps.append(f"round {r}: {node} has no rollouts")
            if node not in by_round.get(r, {}):
                gaps.append(f"round {r}: {node} has no metrics row")
    if cfg.get("rollout_cleanup_enabled"):
        gaps = [g for g in gaps if "rollouts" not in g]     # retired rounds are gone on purpose
    return Check("rollouts and metrics per round", not gaps, "every worker that finished a round published "
                 "rollouts and a metrics row for it" if not gaps else f"{len(gaps)} gaps: {listed(gaps)}")


def _local_workers(folder: ExperimentFolder, by_round: dict[int, dict[str, RoundMetrics]]) -> tuple[list[str], str]:
    """The workers whose checkpoints and logs this machine should hold, and a note on the others: with SWARM_URL
    each machine keeps its own workers' (a worker with neither folder here ran elsewhere)."""
    nodes = sorted({n for nodes in by_round.values() for n in nodes})
    if storage.mounted(folder.state_dir) is None:
        return nodes, ""
    here = [n for n in nodes if folder.checkpoint_dir(n).is_dir() or folder.log_dir(n).is_dir()]
    elsewhere = len(nodes) - len(here)
    return here, f" ({elsewhere} on other machines, where SWARM_URL leaves them)" if elsewhere else ""


def _checkpoints_check(folder: ExperimentFolder, cfg: dict, by_round: dict[int, dict[str, RoundMetrics]]) -> Check:
    interval = setting_of(cfg, "checkpoint_interval", 1)
    stale = []
    nodes, elsewhere = _local_workers(folder, by_round)
    for node in nodes:
        last_round = max(r for r, nodes in by_round.items() if node in nodes)
        saved = [number for p in folder.checkpoint_dir(node).glob("round_*")
                 if (number := round_number(p.name)) is not None and (p / "meta.json").exists()]
        if not saved or max(saved) < last_round - interval:
            stale.append(f"{node}: newest checkpoint {max(saved) if saved else 'none'}, last round {last_round}")
    return Check("checkpoints", not stale, f"every worker has a checkpoint within {interval} rounds of its "
                 f"last round{elsewhere}" if not stale else listed(stale))


def _logs_check(folder: ExperimentFolder, by_round: dict[int, dict[str, RoundMetrics]]) -> Check:
    nodes, elsewhere = _local_workers(folder, by_round)
    no_logs = [n for n in nodes if not (folder.log_dir(n) / "worker.log").exists()]
    return Check("logs", not no_logs, f"every worker has logs/<node>/worker.log{elsewhere}" if not no_logs
                 else f"no log for {', '.join(no_logs)}")


def _missing_rounds(rounds: list[int], shown: int = 10) -> list[int]:
    """The first rounds in 1..max(rounds) without a signed state; linear in the files, whatever number a
    planted round_999999999.json claims."""
    missing: list[int] = []
    expected = 1
    for present in sorted(set(rounds)):
        missing += range(expected, min(present, expected + shown - len(missing)))
        expected = present + 1
        if len(missing) >= shown:
            break
    return missing


def _layout_files(folder: ExperimentFolder, depth: int = 3) -> list[Path]:
    """The experiment's JSON files (checkpoints aside: their own check reads them), at its top and up to `depth`
    folders below (the layout's deepest sit three down), listed through the folder helpers: in the bucket where
    SWARM_URL keeps the records, never through a linked folder, a bounded listing each, so a planted tree costs
    no more than `depth` levels of them."""
    root = folder.root
    top = list_folder(root)      # the local folder: with SWARM_URL the records and their folders are in the bucket
    found = [path for path in top if path.name.endswith(".json")]
    if folder.config_file not in found and is_visible(folder.config_file):
        found.append(folder.config_file)
    level = sorted({*(path for path in top if _may_hold_files(path)),
                    *(root / name for name in storage.MOUNTED if name != folder.config_file.name)}
                   - {root / "checkpoints"})
    for _ in range(depth):
        below = []
        for directory in level:
            for path in list_folder(directory):
                if path.name.endswith(".json"):
                    found.append(path)
                elif _may_hold_files(path):
                    below.append(path)
        level = below
    return sorted(found)


def _may_hold_files(path: Path) -> bool:
    """A folder to look in: locally one that is there (a linked one the listing refuses, with a warning); in a
    bucket any key but a log's, as a folder there is only the prefix of its files."""
    if storage.mounted(path) is not None:
        return not path.name.endswith(storage.LOG_SUFFIX)
    return path.is_dir()


def _held_out_check(folder: ExperimentFolder, keyring: KeyRing, cfg: dict, rounds: list[int],
                    by_round: dict[int, dict[str, RoundMetrics]]) -> Check:
    """Every worker was evaluated before round 1 and, once the swarm finished, after the last round."""
    if not cfg.get("eval_size"):
        return Check("held-out evaluations", True, "none asked for (EVAL_SIZE=0, or an experiment from before them)")
    evals, problems = held_out_by_node(folder, keyring)
    last = rounds[-1] if rounds and read_finished(folder, keyring) else None
    for node in sorted({n for nodes in by_round.values() for n in nodes}):
        done = {row.round for row in evals.get(node, [])}
        if 0 not in done:
            problems.append(f"{node}: none before round 1")
        if last is not None and node in by_round.get(last, {}) and last not in done:
            problems.append(f"{node}: none after the last round {last}")
    if problems:
        return Check("held-out evaluations", False, f"{len(problems)} missing or bad: {listed(problems)}")
    return Check("held-out evaluations", True,
                 "every worker was evaluated at the start" + (" and after the last round" if last else ""))


def format_checks(name: str, checks: list[Check]) -> str:
    lines = [plain(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}") for c in checks]
    failed = sum(not c.passed for c in checks)
    lines.append(f"validate {plain(name)}: {len(checks) - failed}/{len(checks)} checks passed"
                 + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)
