"""The layout of one experiment in the shared folder: `ExperimentFolder` owns every path under it, and the
`round_N` names it gives.

How a file there is read or written is not the layout's: bytes go through safe_io (bounded reads without
following links, atomic writes, bounded listings), records through json_records, logs through jsonl. An
ExperimentFolder tells safe_io that no link below its root is to be followed.
"""

import os
import re
import tempfile
from pathlib import Path

from workers.shared_folder import mount
from workers.shared_folder.rejections import NODE_NAME, FolderError, check_node_name
from workers.shared_folder.safe_io import (MAX_LISTED, MAX_SCANNED, is_visible, list_folder, list_names,
                                          refuse_links_below)

ROUND_DIGITS = re.compile(r"[0-9]{1,9}")      # ASCII only: str.isdigit() also takes '²', which int() refuses
MAX_ROUND = 999_999_999
FIRST_KEPT = 16           # of a long run's round states, the oldest kept beside the newest (and the newest looked for)
# the folders a new experiment starts with; base/ appears with the warm-up's result, config.json beside them
SUBFOLDERS = ("state", "peers", "rollouts", "rewards", "metrics", "checkpoints", "logs", "keys")
SUPERVISOR = "supervisor"       # logs/supervisor/ and logs/supervisor-<NODE_ID>/: reserved as NODE_IDs (configs_env)
MAX_MACHINES = 32               # machines that joined, read by status and experiments


def _fixed(*parts: str) -> property:
    """A path at a fixed place in the experiment folder, read as an attribute (`folder.keys_dir`)."""
    return property(lambda folder: folder.root.joinpath(*parts))


class ExperimentFolder:
    """Paths of one experiment: <GDRIVE_PATH>/experiments/<EXPERIMENT_NAME>/ and the seeds' layout under it."""

    config_file = _fixed("config.json")
    state_dir = _fixed("state")
    finished_file = _fixed("state", "finished.json")
    # held by the one `rl-swarm up` (or `pretrain`) of the experiment, from before its warm-up to its end
    coordinator_lease_file = _fixed("state", "coordinator.lease.json")
    keys_dir = _fixed("keys")
    base_dir = _fixed("base")
    rollouts_dir = _fixed("rollouts")
    peers_dir = _fixed("peers")
    supervisor_log_dir = _fixed("logs", "supervisor")     # of the machine that runs the coordinator
    events_file = _fixed("logs", "supervisor", "events.jsonl")        # of the coordinator's machine: events_file_of
    monitor_file = _fixed("logs", "supervisor", "monitor.jsonl")

    def __init__(self, root: Path):
        self.root = Path(root)
        refuse_links_below(self.root)

    def create(self) -> "ExperimentFolder":
        """The experiment's folders made (the CLI checked GDRIVE_PATH before: this is the last word, in one line,
        for what changed since, or a caller that did not check)."""
        try:
            for sub in SUBFOLDERS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            mount.claim(self.root)
            # mkstemp, not a name of ours: a link planted at a predictable name would have us truncate its target
            fd, probe = tempfile.mkstemp(dir=self.root / "state", prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise FolderError(f"{self.root}: the shared folder is not writable ({exc.strerror or exc}{where}); "
                              "check GDRIVE_PATH and that the Drive is mounted") from exc
        return self

    def round_state_file(self, round_: int) -> Path:
        return self.root / "state" / f"round_{round_:06d}.json"

    def public_key_file(self, node: str) -> Path:
        return self.keys_dir / f"{check_node_name(node)}.pub"

    def heartbeat_file(self, node: str) -> Path:
        return self.root / "peers" / f"{check_node_name(node)}.json"

    def rollout_dir(self, round_: int) -> Path:
        # one stage a round: the folder keeps the seeds' stage_0 level, so older folders still read
        return self.root / "rollouts" / f"round_{round_}" / "stage_0"

    def rollout_file(self, round_: int, node: str, part: int | None = None) -> Path:
        name = check_node_name(node) if part is None else f"{check_node_name(node)}.part{part}"
        return self.rollout_dir(round_) / f"{name}.json"

    def reward_file(self, round_: int, node: str) -> Path:
        return self.rewards_dir(round_) / f"{check_node_name(node)}.json"

    def metrics_file(self, node: str) -> Path:
        return self.root / "metrics" / check_node_name(node) / "metrics.jsonl"

    def eval_file(self, node: str) -> Path:
        return self.root / "metrics" / check_node_name(node) / "eval.jsonl"

    def metrics_files(self, name: str = "metrics.jsonl") -> list[Path]:
        """Every node's metrics (or eval.jsonl) file, by node name; listed through the helpers, so on an object
        store too, and never through a linked folder."""
        return [path for node in list_folder(self.root / "metrics") for path in list_folder(node, name)]

    def rewards_dir(self, round_: int) -> Path:
        return self.root / "rewards" / f"round_{round_}"

    def checkpoint_dir(self, node: str) -> Path:
        return self.root / "checkpoints" / check_node_name(node)

    def log_dir(self, node: str) -> Path:
        return self.root / "logs" / check_node_name(node)

    def supervisor_dir(self, machine: str | None = None) -> Path:
        """A machine's supervisor log, events and monitor samples: logs/supervisor/ of the machine that runs the
        coordinator (None), logs/supervisor-<NODE_ID>/ of one that joined. Each machine appends to its own files
        only: two runtimes appending to one file through Drive would each upload their copy over the other's."""
        if machine is None:
            return self.supervisor_log_dir
        return self.root / "logs" / f"{SUPERVISOR}-{check_node_name(machine)}"

    def events_file_of(self, machine: str | None = None) -> Path:
        return self.supervisor_dir(machine) / "events.jsonl"

    def monitor_file_of(self, machine: str | None = None) -> Path:
        return self.supervisor_dir(machine) / "monitor.jsonl"

    def joined_machines(self) -> list[str]:
        """The NODE_IDs of machines that joined and keep supervisor files here, at most MAX_MACHINES: those with a
        heartbeat of one of their workers first (a peer's planted folders do not crowd out a real machine's).
        OSError for a Drive hiccup."""
        def has_workers(name: str) -> bool:
            node = name.removeprefix(f"{SUPERVISOR}-")
            return NODE_NAME.fullmatch(node) is not None and any(
                os.path.lexists(self.root / "peers" / f"{worker}.json") for worker in (node, f"{node}-1"))

        listed = list_folder(self.root / "logs", f"{SUPERVISOR}-*", limit=MAX_MACHINES, first=has_workers)
        return [name for name in (path.name.removeprefix(f"{SUPERVISOR}-") for path in listed)
                if NODE_NAME.fullmatch(name)]

    def state_rounds_from(self, at_least: int, most: int) -> list[int] | None:
        """Rounds at_least, at_least + 1, ... whose state file is there, looked at one by one (the coordinator
        writes them in order): where a listing of state/ costs O(rounds) (2.3 ms of CPU at round 2000), a poll
        that finds no new round looks at one file. None past `most` of them: list state/ then."""
        found: list[int] = []
        while is_visible(self.round_state_file(at_least + len(found))):
            found.append(at_least + len(found))
            if len(found) >= most:
                return None
        return found

    def state_rounds(self) -> list[int]:
        """Round numbers with a state file, ascending; OSError for a Drive hiccup. Of a run past MAX_LISTED rounds,
        the oldest FIRST_KEPT (its start and pace are read there) and the newest.

        A listing is bounded (MAX_SCANNED names of a folder, storage.MAX_LISTED of a bucket, in name order), so the
        later rounds of a run longer than that are found by looking at single files after the newest listed."""
        names = list_names(self.state_dir, "round_*.json", MAX_SCANNED, warn_when_cut=False)
        found = sorted(number for number in (round_number(name.removesuffix(".json")) for name in names)
                       if number is not None)
        if len(found) < MAX_LISTED:
            return found
        newest, listed = self._newest_from(found[-1]), set(found)      # one look when the listing held the newest
        found = sorted(listed.union(round_ for round_ in range(max(1, newest - FIRST_KEPT), newest + 1)
                                    if round_ in listed or round_ == newest or self._there(round_)))
        oldest = min(FIRST_KEPT, MAX_LISTED // 2)
        return found[:oldest] + found[oldest - MAX_LISTED:]

    def _there(self, round_: int) -> bool:
        return is_visible(self.round_state_file(round_))

    def _newest_from(self, known: int) -> int:
        """The newest round whose state file is there, from `known` (whose file is) on, in steps that double then
        halve (the coordinator writes its rounds one after another); ~60 looks at most. Files a peer planted or
        deleted at the looked-at names can hide the newest rounds from it, never pass for one: a round is read as
        its state signed by the coordinator."""
        newest, step = known, 1
        while newest + step <= MAX_ROUND and self._there(newest + step):
            newest, step = newest + step, step * 2
        missing = min(newest + step, MAX_ROUND + 1)        # not there, or past the last name
        while missing - newest > 1:
            middle = (newest + missing) // 2
            newest, missing = (middle, missing) if self._there(middle) else (newest, middle)
        return newest


def runs_on(machine: str | None, node: str) -> bool:
    """Whether a machine's supervisor files may speak for `node`: the coordinator's machine's (None) for any, those
    of one that joined as NODE_ID X for its own workers only (X, X-1, X-2 ...). This keeps a machine's numbers on
    its own rows; it proves nothing, as these files are not signed (any peer can write them)."""
    return machine is None or re.fullmatch(re.escape(machine) + r"(-[0-9]+)?", node) is not None


def round_number(name: str) -> int | None:
    """N of a `round_N` name (state files, rollout and checkpoint folders); None for anything else."""
    digits = name.removeprefix("round_")
    return int(digits) if name.startswith("round_") and ROUND_DIGITS.fullmatch(digits) else None
