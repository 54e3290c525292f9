"""Records exchanged through the shared folder, each with a schema version and a validating from_json."""

import math
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from workers.shared_folder.rejections import RejectedFile, check_node_name

# 2: records that speak for a node carry its signature (workers.shared_folder.signing); records of schema 1
# still read where nothing depends on who wrote them (status, experiments, validate of older folders)
SCHEMA = 2


class Status:
    """The words a heartbeat's status says, named once. A worker moves WAITING -> GENERATING -> FETCHING ->
    TRAINING (-> EVALUATING) -> WAITING each round; the supervisor shows RESTARTING and FAILED for its processes."""

    STARTING, WAITING, WAITING_FOR_COORDINATOR = "starting", "waiting", "waiting for the coordinator"
    GENERATING, FETCHING, TRAINING, EVALUATING = "generating", "fetching", "training", "evaluating"
    RUNNING = "running"                                  # the coordinator's, while it starts rounds
    DONE, STOPPED, CRASHED = "done", "stopped", "crashed"
    RESTARTING, FAILED = "restarting", "failed"          # shown by a supervisor for its own processes
    TERMINAL = (STOPPED, DONE, FAILED, CRASHED)          # a node in one of these will publish no more
    IDLE = (WAITING, WAITING_FOR_COORDINATOR)            # nothing to do: never counted as hung
    TROUBLE = (FAILED, CRASHED, RESTARTING)


# kinds of the supervisors' events (ExperimentFolder.events_file_of) that programs count
EVENT_RESTART, EVENT_UNLEARNING, EVENT_FAILED = "restart", "unlearning", "failed"
MAX_TEXT = 16_384          # characters of one question, prompt or completion
MAX_GROUP = 256            # completions in one group (NUM_GENERATIONS is capped at 256 too)
MAX_GROUPS = 1024
MAX_COMPLETION_IDS = 4097   # MAX_NEW_TOKENS is at most 4096, EOS may follow
MAX_TOKEN_ID = 2**20        # above any vocabulary this project loads
MAX_TASKS = 64             # tasks named in one metrics row
# no honest metrics row holds a number this large; a peer's 1e308 made the views' sums and scales overflow
MAX_NUMBER = 1e15
TASK_NAME = re.compile(r"[a-z0-9_]{1,64}")      # reasoning-gym's dataset names
# a file or group a node refused, as its heartbeat names it for people (never a path): the characters of the
# layout's paths and of a group's name ("round 3 rollouts of w-9, group 0"), the newest few
REFUSED_CHARACTERS = "A-Za-z0-9._/, -"         # of a refused file's name as a heartbeat carries it
REFUSED_NAME = re.compile(f"[{REFUSED_CHARACTERS}]{{1,160}}")
REFUSED_NAMES = 5
# a field typed `X | None` may be absent or null: it was added after the first metrics files were written
_OPTIONAL = {float | None: (float, True), int | None: (int, True)}


def _need(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = record.get(key)
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise RejectedFile(f"{where}: field {key!r} must be a number, not a boolean")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RejectedFile(f"{where}: field {key!r} must be {expected}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RejectedFile(f"{where}: field {key!r} is not a finite number")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise RejectedFile(f"{where}: field {key!r} is longer than {MAX_TEXT} characters")
    return value


def _check_schema(record: dict[str, Any], where: str) -> None:
    version = record.get("schema")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= SCHEMA:
        raise RejectedFile(f"{where}: schema version {version!r} is not one of 1..{SCHEMA} (written by another "
                           "rl-swarm version?); skipped")


@dataclass(frozen=True)
class RoundState:
    """The coordinator's word that a round has begun; one write-once file per round."""

    round: int
    max_rounds: int
    started_at: float
    reason: str
    nodes: tuple[str, ...] = ()     # the workers the coordinator expects this round; peers wait for these
    # the round this coordinator's run began with (a resume begins a run): the pace leaves out the downtime before it
    run_first_round: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self), "nodes": list(self.nodes)}

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str = "round state") -> "RoundState":
        _check_schema(record, where)
        nodes = _need({"nodes": [], **record}, "nodes", list, where)     # absent in the first state files
        state = cls(round=_need(record, "round", int, where), max_rounds=_need(record, "max_rounds", int, where),
                    started_at=float(_need(record, "started_at", (int, float), where)),
                    reason=_need(record, "reason", str, where),
                    nodes=tuple(check_node_name(n) for n in nodes[:1024]),
                    # absent before runs were told apart: the whole experiment reads as one run
                    run_first_round=_need({"run_first_round": 1, **record}, "run_first_round", int, where))
        if not 1 <= state.round <= state.max_rounds:
            raise RejectedFile(f"{where}: round {state.round} is outside 1..{state.max_rounds}")
        if not 1 <= state.run_first_round <= state.round:
            raise RejectedFile(f"{where}: its run's first round {state.run_first_round} is outside 1..{state.round}")
        return state


@dataclass(frozen=True)
class SwarmFinished:
    """The coordinator's word that all rounds are done (state/finished.json): every worker then leaves."""

    rounds: int
    finished_at: float

    def covers(self, max_rounds: int) -> bool:
        """Whether a run of `max_rounds` is done: a raised MAX_ROUNDS continues the experiment."""
        return self.rounds >= max_rounds

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str = "finished.json") -> "SwarmFinished":
        _check_schema(record, where)
        return cls(rounds=_need(record, "rounds", int, where),
                   finished_at=float(_need(record, "finished_at", (int, float), where)))


def refused_name(name: str) -> str:
    """A refused file's or group's name as a heartbeat carries it: each character past REFUSED_NAME's a '?'."""
    return re.sub(f"[^{REFUSED_CHARACTERS}]", "?", name)[:160] or "?"


@dataclass(frozen=True)
class Heartbeat:
    """A node's own liveness record in peers/; rewritten only by that node."""

    node: str
    role: str
    pid: int
    host: str
    instance: str            # random per process start: two live processes with one NODE_ID differ here
    status: str
    round: int
    started_at: float
    updated_at: float
    last_reward: float | None = None
    last_accuracy: float | None = None
    last_error: str | None = None
    progress_at: float = 0.0         # when the status last changed: a beating but stuck worker shows here
    rejected: int = 0                # files and groups from the folder this node refused to trust
    note: str | None = None          # trouble the node works around, e.g. a folder that refused its writes
    device: str | None = None        # where a worker runs (cpu, cuda:1): `rl-swarm status` shows it
    rejected_names: tuple[str, ...] = ()     # the newest it refused (REFUSED_NAME): the supervisor's events say them

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self), "stage": 0}     # "stage": read by versions before stages went

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str = "heartbeat") -> "Heartbeat":
        _check_schema(record, where)
        optional = {}
        for key in ("last_reward", "last_accuracy"):
            value = record.get(key)
            optional[key] = None if value is None else float(_need(record, key, (int, float), where))
        for key in ("last_error", "note", "device"):
            text = record.get(key)
            optional[key] = None if text is None else _need(record, key, str, where)[:500]
        if "progress_at" in record:
            optional["progress_at"] = float(_need(record, "progress_at", (int, float), where))
        if "rejected" in record:
            optional["rejected"] = max(0, _need(record, "rejected", int, where))
        # a name past the pattern, or names that are no list, are left out, not the node's liveness
        names = record.get("rejected_names")
        optional["rejected_names"] = tuple([n for n in names if isinstance(n, str) and REFUSED_NAME.fullmatch(n)]
                                           [-REFUSED_NAMES:]) if isinstance(names, (list, tuple)) else ()
        return cls(node=check_node_name(_need(record, "node", str, where)), role=_need(record, "role", str, where),
                   pid=_need(record, "pid", int, where), host=_need(record, "host", str, where)[:128],
                   instance=_need(record, "instance", str, where)[:64], status=_need(record, "status", str, where)[:32],
                   round=_need(record, "round", int, where),
                   started_at=float(_need(record, "started_at", (int, float), where)),
                   updated_at=float(_need(record, "updated_at", (int, float), where)), **optional)

    @classmethod
    def first(cls, node: str, role: str, status: str) -> "Heartbeat":
        """A process's first beat: its pid and host, a fresh instance id (two processes with one node id differ
        there), round 0."""
        now = time.time()
        return cls(node=node, role=role, pid=os.getpid(), host=socket.gethostname(), instance=uuid.uuid4().hex[:12],
                   status=status, round=0, started_at=now, updated_at=now, progress_at=now)

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.updated_at)


@dataclass(frozen=True)
class RolloutGroup:
    """G completions of one question, named by what reasoning-gym needs to build it again.

    A reader builds the question, its answer and its prompt itself from task, dataset_seed and index, and
    scores the completions: a peer chooses neither the rewards nor what a scorer reads besides its answers.
    """

    task: str
    dataset_seed: int | None        # None in files written before questions were named (they cannot be rebuilt)
    index: int | None
    completions: tuple[str, ...]
    finished: tuple[bool, ...]      # the completion ended with EOS (so EOS is part of what is trained)
    rewards: tuple[float, ...]      # the publisher's scores: shown, never trusted for training
    # the publisher's question, answer, metadata and prompt: written for people reading the file (and for
    # rl-swarm versions that still read them), never read back
    for_people: dict[str, Any] = field(default_factory=dict, compare=False)
    # the token ids the publisher sampled (EOS last when finished); a reader checks they spell the completion
    # and trains on them, since the text tokenised again can come out other ids and longer. None in older files
    completion_ids: tuple[tuple[int, ...], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        ids = {} if self.completion_ids is None else {"completion_ids": [list(c) for c in self.completion_ids]}
        return {**self.for_people, "task": self.task, "dataset_seed": self.dataset_seed, "index": self.index,
                "completions": list(self.completions), "finished": list(self.finished),
                "rewards": list(self.rewards), **ids}

    @classmethod
    def from_json(cls, record: Any, where: str) -> "RolloutGroup":
        if not isinstance(record, dict):
            raise RejectedFile(f"{where}: a group must be a JSON object")
        completions = _need(record, "completions", list, where)
        finished = _need(record, "finished", list, where)
        rewards = _need(record, "rewards", list, where)
        if not 1 <= len(completions) <= MAX_GROUP or not len(completions) == len(finished) == len(rewards):
            raise RejectedFile(f"{where}: completions, finished and rewards must be 1..{MAX_GROUP} long and equal")
        if not all(isinstance(c, str) and len(c) <= MAX_TEXT for c in completions):
            raise RejectedFile(f"{where}: every completion must be a string of at most {MAX_TEXT} characters")
        if not all(isinstance(f, bool) for f in finished):
            raise RejectedFile(f"{where}: 'finished' must hold booleans")
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rewards):
            raise RejectedFile(f"{where}: 'rewards' must hold finite numbers")
        task = _need(record, "task", str, where)
        if not TASK_NAME.fullmatch(task):
            raise RejectedFile(f"{where}: task {task[:40]!r} is not a reasoning-gym task name")
        named = {key: None if record.get(key) is None else _need(record, key, int, where)
                 for key in ("dataset_seed", "index")}
        return cls(task=task, **named, completions=tuple(completions),
                   finished=tuple(finished), rewards=tuple(float(r) for r in rewards),
                   completion_ids=_completion_ids(record.get("completion_ids"), len(completions), where))


@dataclass(frozen=True)
class RolloutFile:
    """What one node publishes for one round."""

    node: str
    round: int
    created_at: float
    groups: tuple[RolloutGroup, ...]

    def to_json(self) -> dict[str, Any]:
        # "stage": 0 for versions before stages went (a round had one stage, always 0)
        return {"schema": SCHEMA, "node": self.node, "round": self.round, "stage": 0,
                "created_at": self.created_at, "groups": [g.to_json() for g in self.groups]}

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str) -> "RolloutFile":
        _check_schema(record, where)
        groups = _need(record, "groups", list, where)
        if len(groups) > MAX_GROUPS:
            raise RejectedFile(f"{where}: more than {MAX_GROUPS} groups")
        if record.get("stage", 0) != 0:
            raise RejectedFile(f"{where}: stage {record.get('stage')!r}; a round has one stage, 0")
        return cls(node=check_node_name(_need(record, "node", str, where)), round=_need(record, "round", int, where),
                   created_at=float(_need(record, "created_at", (int, float), where)),
                   groups=tuple(RolloutGroup.from_json(g, f"{where} group {i}") for i, g in enumerate(groups)))


@dataclass(frozen=True)
class RoundMetrics:
    """One worker's result for one round: a line of metrics.jsonl, and its rewards/ file that marks the round done."""

    node: str
    round: int
    reward_mean: float
    accuracy: float               # exact-match rate (score == 1.0); reasoning-gym gives partial credit
    loss: float | None            # None when the update's loss was not a finite number (the step was skipped)
    local_groups: int
    external_groups: int
    external_available: int
    zero_advantage_groups: int
    completions: int
    mean_completion_tokens: float
    generate_s: float             # sampling the local completions
    fetch_s: float                # the exchange: publishing ours, waiting for and re-scoring peers' groups
    train_s: float
    round_s: float
    finished_at: float = field(default_factory=time.time)
    # Added later: None in lines written before them (and kl whenever KL_BETA is 0 or nothing was trained)
    reward_std: float | None = None
    reward_max: float | None = None
    format_rate: float | None = None            # share of completions with a well-formed <answer> tag
    max_completion_tokens: int | None = None
    grad_norm: float | None = None              # before clipping; 0.0 when no group carried signal
    clip_fraction: float | None = None
    learning_rate: float | None = None
    kl: float | None = None
    score_s: float | None = None                # scoring the local completions
    external_zero_advantage_groups: int | None = None   # peers' usable groups dropped for equal rewards
    # the most GPU memory torch's allocator has held since the worker started (MiB; None on CPU): exact,
    # where NVML sampled once a second misses an update's brief peak
    gpu_peak_mib: float | None = None
    # mean reward of this round's own completions per task: the paper reports reward per task
    task_rewards: dict[str, float] | None = None
    # optimizer steps skipped because their gradient held a NaN or inf (the weights stayed as they were)
    skipped_steps: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str = "metrics") -> "RoundMetrics":
        _check_schema(record, where)
        values: dict[str, Any] = {"task_rewards": _task_numbers(record.get("task_rewards"), where)}
        for f in fields(cls):
            if f.name == "task_rewards":
                continue
            kind, optional = _OPTIONAL.get(f.type, (f.type, False))
            if optional and record.get(f.name) is None:
                values[f.name] = None
            elif kind is float:
                values[f.name] = float(_need(record, f.name, (int, float), where))
            else:
                values[f.name] = _need(record, f.name, kind, where)
            if kind in (int, float) and values[f.name] is not None and abs(values[f.name]) > MAX_NUMBER:
                raise RejectedFile(f"{where}: field {f.name!r} is beyond +-{MAX_NUMBER:g}")
        values["node"] = check_node_name(values["node"])
        return cls(**values)


def _completion_ids(value: Any, count: int, where: str) -> tuple[tuple[int, ...], ...] | None:
    """One list of token ids per completion, each bounded in length and value; None when absent."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count:
        raise RejectedFile(f"{where}: 'completion_ids' must hold one list per completion")
    for ids in value:
        # type(i) is int: not a bool, which is an int too; min and max in C, not a comparison per id in Python
        if not isinstance(ids, list) or len(ids) > MAX_COMPLETION_IDS or not all(type(i) is int for i in ids) \
                or (ids and (min(ids) < 0 or max(ids) >= MAX_TOKEN_ID)):
            raise RejectedFile(f"{where}: 'completion_ids' must be lists of at most {MAX_COMPLETION_IDS} token ids")
    return tuple(tuple(ids) for ids in value)


def _task_numbers(value: Any, where: str) -> dict[str, float] | None:
    """A small {task: finite number} map, or None; task names are matched like node names."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_TASKS:
        raise RejectedFile(f"{where}: field 'task_rewards' must be an object of at most {MAX_TASKS} tasks")
    out = {}
    for task, number in value.items():
        if not TASK_NAME.fullmatch(task) or isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not math.isfinite(number) or abs(number) > MAX_NUMBER:
            raise RejectedFile(f"{where}: 'task_rewards' entry {task[:40]!r} must map a task name to a finite number")
        out[task] = float(number)
    return out


@dataclass(frozen=True)
class HeldOutEval:
    """Greedy exact-match of one node's policy on the held-out questions; a line of metrics/<node>/eval.jsonl."""

    node: str
    round: int                    # the rounds played before it: 0 is the start, before round 1
    accuracy: float
    questions: int
    seconds: float
    finished_at: float = field(default_factory=time.time)
    # what the answers looked like (absent in lines from before them): their mean length in tokens, and how many
    # ran to MAX_NEW_TOKENS without ending (a batch of answers takes as long as its longest)
    mean_tokens: float | None = None
    cut_off: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str = "held-out evaluation") -> "HeldOutEval":
        _check_schema(record, where)
        mean_tokens, cut_off = record.get("mean_tokens"), record.get("cut_off")
        row = cls(node=check_node_name(_need(record, "node", str, where)), round=_need(record, "round", int, where),
                  accuracy=float(_need(record, "accuracy", (int, float), where)),
                  questions=_need(record, "questions", int, where),
                  seconds=float(_need(record, "seconds", (int, float), where)),
                  finished_at=float(_need(record, "finished_at", (int, float), where)),
                  mean_tokens=None if mean_tokens is None else float(_need(record, "mean_tokens", (int, float), where)),
                  cut_off=None if cut_off is None else _need(record, "cut_off", int, where))
        if row.round < 0 or row.questions < 1 or not 0.0 <= row.accuracy <= 1.0 or \
                not 0 <= (row.cut_off or 0) <= row.questions or not 0.0 <= (row.mean_tokens or 0.0) < 1e6:
            raise RejectedFile(f"{where}: round {row.round}, {row.questions} questions, accuracy {row.accuracy}, "
                               f"{row.cut_off} cut off or {row.mean_tokens} tokens is out of range")
        return row
