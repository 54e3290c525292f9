"""Starting on an experiment that exists: whether rounds are left to run, what a resumed `up` says and records, and
the settings a machine that joins takes from it.

A resumed run goes on from its workers' checkpoints, so it must load the model they hold. Other settings that shape
the rounds (the split, the tasks, the seed, the learning rate, ...) may change: the console says which, from what
to what, and config.json keeps the change beside the settings the resumed run uses, so the record stays true of
the rounds before it too. A machine that joins plays the rounds as the experiment does: peers drop groups of
another G or longer than their MAX_NEW_TOKENS, so it takes those settings from config.json, as advice (a value the
setting's own parser refuses is left out, and said so).
"""

import json
import time
from dataclasses import dataclass, field, fields
from typing import Any

from configs_env import SETTINGS, ConfigError, SwarmConfig, SwarmError
from configs_env.parsing import spelled
from swarm_supervisor.readable import plain
from workers.shared_folder.exchange import newest_signed_round, read_finished
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import SCHEMA, RoundState
from workers.shared_folder.recorded_config import CONFIG_BYTES, COORDINATOR_INSTANCE, read_recorded_config
from workers.shared_folder.rejections import RejectedFile, warn_once
from workers.shared_folder.retries import with_retries
from workers.shared_folder.signing import KeyRing

SIGNATURE_ROOM = 1024   # bytes of config.json beside its record: the signature and its key's name
SHAPING = {s.attr: s.env for s in SETTINGS if s.shapes_run}
# what a joining machine takes from config.json: what shapes the rounds, less NUM_WORKERS (this machine's own count
# of workers), and the rounds' number (its round states then keep it current: a resumed coordinator may raise it)
JOINED = {s.attr: s.env for s in SETTINGS if s.attr == "max_rounds" or (s.shapes_run and s.attr != "num_workers")}
# a setting whose null means "unset" (LEARNING_RATE: the model's default rate) is taken as such
UNSET_ALLOWED = {f.name for f in fields(SwarmConfig) if f.default is None}
SHOWN_REFUSAL = 200     # characters of a refused config.json value's line: the file may hold a value of 256 KiB


class ExperimentFinished(SwarmError):
    """A machine asked to join an experiment whose coordinator already ran all its rounds."""


def finished_note(folder: ExperimentFolder, keyring: KeyRing, cfg: SwarmConfig, joining: bool = False) -> str | None:
    """Why the experiment has no round left to run (its coordinator's signed finished.json covers MAX_ROUNDS), or
    None. A joining machine's own MAX_ROUNDS does not count: only its coordinator runs rounds, and it has ended."""
    finished = read_finished(folder, keyring)
    if finished is None or not (joining or finished.covers(cfg.max_rounds)):
        return None
    if joining:
        return f"experiment {cfg.experiment_name!r} already finished its {finished.rounds} rounds; its `rl-swarm up` " \
               "continues it with a raised MAX_ROUNDS (join then), or set a new EXPERIMENT_NAME"
    return f"experiment {cfg.experiment_name!r} is finished (round {finished.rounds} of {finished.rounds}); nothing " \
           f"to run: MAX_ROUNDS above {finished.rounds} extends it (e.g. MAX_ROUNDS={2 * finished.rounds}), " \
           "another EXPERIMENT_NAME starts a new one"


@dataclass(frozen=True)
class Resume:
    """How `up` starts its rounds: at `round` (0: a new experiment) with the settings of config.json `recorded`."""

    round: int = 0
    recorded: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)     # setting -> (recorded, now), as JSON

    def lines(self, cfg: SwarmConfig) -> list[str]:
        """What the console says of a resume: where it goes on, and each setting that changed."""
        if not self.round:
            return []
        was = self.recorded.get("max_rounds")
        raised = f" (MAX_ROUNDS was {was})" if isinstance(was, int) and was != cfg.max_rounds else ""
        return [f"resuming experiment {cfg.experiment_name!r} at round {self.round} of {cfg.max_rounds}{raised}",
                *(f"{SHAPING[attr]} changed from {spelled(old)} to {spelled(new)} (config.json records both)"
                  for attr, (old, new) in self.changes.items())]

    def record(self, cfg: SwarmConfig, model_name: str, device_label: str, instance: str) -> dict[str, Any]:
        """config.json: the settings this run uses, and the lease `instance` of the `up` that runs with them; a
        resume keeps the experiment's first start and its changes."""
        now = time.time()
        started = self.recorded.get("started_at") if self.round else None
        changes = self.recorded.get("setting_changes") if self.round else None
        changes = list(changes) if isinstance(changes, list) else []
        if self.changes:
            changes.append({"round": self.round, "at": now,
                            "settings": {attr: [old, new] for attr, (old, new) in self.changes.items()}})
        record = {"schema": SCHEMA, **cfg.to_json(), "model_resolved": model_name, "device_resolved": device_label,
                  "started_at": started if isinstance(started, (int, float)) else now, COORDINATOR_INSTANCE: instance}
        if self.round:
            record["resumed_at"] = now
        # config.json is read within CONFIG_BYTES: a run resumed with changes time and again keeps the newest that fit
        while changes and len(json.dumps({**record, "setting_changes": changes})) > CONFIG_BYTES - SIGNATURE_ROOM:
            changes = changes[1:]
        if changes:
            record["setting_changes"] = changes
        return record


def refuse_past_max_rounds(newest: RoundState, cfg: SwarmConfig) -> None:
    """ConfigError when the experiment already started a round past cfg's MAX_ROUNDS: resumed, it would play that
    round past its MAX_ROUNDS and call the experiment finished."""
    if newest.round > cfg.max_rounds:
        raise ConfigError(f"MAX_ROUNDS={cfg.max_rounds}: experiment {cfg.experiment_name!r} already started round "
                          f"{newest.round} (of {newest.max_rounds}); set MAX_ROUNDS={newest.max_rounds} (or anything "
                          f"from {newest.round}) to resume it, or a new EXPERIMENT_NAME")


def plan_resume(folder: ExperimentFolder, keyring: KeyRing, cfg: SwarmConfig, model_name: str) -> Resume:
    """Where the experiment's rounds go on and what changed since config.json; ConfigError, before anything is
    written, for a model other than its checkpoints hold or a MAX_ROUNDS below the round it reached."""
    newest = with_retries(lambda: newest_signed_round(folder, keyring), f"listing {folder.state_dir}")
    if newest is None:       # no round ran: nothing trained on the recorded settings, nothing to keep of them
        return Resume()
    refuse_past_max_rounds(newest, cfg)
    recorded = _recorded(folder, keyring)
    before = recorded.get("model_resolved")
    if isinstance(before, str) and before != model_name:
        asked = f"MODEL_NAME={cfg.model_name}" if cfg.model_name else f"MODEL_NAME unset (here: {model_name})"
        raise ConfigError(f"{asked}: experiment {cfg.experiment_name!r} ran {newest.round} rounds of {before}, and "
                          f"its checkpoints hold that model; set MODEL_NAME={before} to resume it, or a new "
                          "EXPERIMENT_NAME")
    return Resume(newest.round, recorded, changed_settings(recorded, cfg, SHAPING))


def changed_settings(recorded: dict[str, Any], cfg: SwarmConfig, attrs: dict[str, str]) -> dict[str, tuple[Any, Any]]:
    """Each of `attrs` whose value in config.json `recorded` differs from `cfg`'s: setting -> (recorded, now), as
    JSON."""
    now = cfg.to_json()
    return {attr: (recorded[attr], now[attr]) for attr in attrs if attr in recorded and recorded[attr] != now[attr]}


def joined_settings(folder: ExperimentFolder, keyring: KeyRing, cfg: SwarmConfig) -> tuple[SwarmConfig, list[str]]:
    """This machine's settings with the experiment's values of JOINED, parsed as the environment's would be, and
    what the console says of them (one line each: what was taken, what was refused)."""
    recorded = _recorded(folder, keyring)
    if not recorded:
        return cfg, [f"experiment {cfg.experiment_name!r} has no config.json its coordinator signed: this machine "
                     "plays its rounds with its own settings (check that G, TASKS and MAX_NEW_TOKENS match the "
                     "swarm's)"]
    joined, lines = adopted_settings(recorded, cfg)
    taken = [attr for attr in JOINED if getattr(joined, attr) != getattr(cfg, attr)]
    if taken:
        now = joined.to_json()
        lines.append(f"joining experiment {cfg.experiment_name!r} with its settings (config.json): " + ", ".join(
            f"{JOINED[attr]}={spelled(now[attr])} (this machine's: {spelled(cfg.to_json()[attr])})"
            for attr in taken))
    return joined, lines


def adopted_settings(recorded: dict[str, Any], cfg: SwarmConfig) -> tuple[SwarmConfig, list[str]]:
    """This machine's settings `cfg` with the values of JOINED in config.json `recorded` that their parsers take,
    and a line for each value (or set of values) refused, which this machine keeps its own of."""
    taken, lines = {}, []
    for attr, (theirs, mine) in changed_settings(recorded, cfg, JOINED).items():
        try:
            value = _parsed(attr, theirs)
        except ConfigError as refused:
            lines.append(_refusal(cfg, refused, f"this machine keeps {JOINED[attr]}={spelled(mine)}"))
            continue
        if value != getattr(cfg, attr):       # a value spelled otherwise (1e-05 and 0.00001) is no change
            taken[attr] = value
    joined = cfg.with_overrides(**taken)
    try:
        joined.check("join")
    except ConfigError as refused:
        return cfg, [*lines, _refusal(cfg, refused, "this machine plays with its own settings")]
    return joined, lines


def _parsed(attr: str, recorded: Any) -> Any:
    """A config.json value read as its environment variable would be: the same parser, the same bounds."""
    if recorded is None and attr in UNSET_ALLOWED:
        return None
    setting = next(s for s in SETTINGS if s.attr == attr)
    return setting.parse(setting.env, spelled(recorded))


def _refusal(cfg: SwarmConfig, refused: ConfigError, instead: str) -> str:
    """One line, of bounded length, for a config.json value this machine does not take."""
    line = plain(f"config.json of experiment {cfg.experiment_name!r}: {refused}; {instead}")
    return line if len(line) <= SHOWN_REFUSAL else f"{line[:SHOWN_REFUSAL - 3]}..."


def _recorded(folder: ExperimentFolder, keyring: KeyRing) -> dict[str, Any]:
    """The coordinator's config.json; {} when there is none it signed (then nothing is compared)."""
    try:
        return with_retries(lambda: read_recorded_config(folder, keyring), f"reading {folder.config_file}",
                            retry_missing=False)
    except FileNotFoundError:
        return {}
    except RejectedFile as refused:
        warn_once(str(refused))
        return {}
