"""The swarm's settings: read from the environment once, validated in one place, frozen."""

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from configs_env import parsing as p
from configs_env.errors import ConfigError
from configs_env.presets import PRESETS, TEST_MODE_VALUES, preset_names

DEFAULT_TASKS = "chain_sum:1,basic_arithmetic:1"


@dataclass(frozen=True)
class Setting:
    """One knob as the CLI lists it: the environment variable, the field, the parser and the help line."""

    env: str
    attr: str
    parse: p.Parser
    help: str
    shapes_run: bool


def setting(default: Any, env: str, parse: p.Parser, help: str, shapes_run: bool = False) -> Any:
    """A config field that names its environment variable, its parser and its help line (README, --help);
    shapes_run: what the rounds train on or how (a resumed experiment says when it changed), not where they run,
    how long they wait or what is shown."""
    return field(default=default, metadata={"env": env, "parse": p.suggesting(parse, default), "help": help,
                                            "shapes_run": shapes_run})


def waits_for_lag(values: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, float]:
    """The waits a DRIVE_LAG of L seconds needs, for those not set explicitly: a peer's rollouts show up L after
    their publish (fetch: 2L and a margin), a round is seen done after the lag three times over plus the fetch,
    and a heartbeat L old is still news (PEER_TIMEOUT's "late" quarter above L)."""
    lag = values.get("drive_lag", 0.0)
    if not lag:
        return {}
    default = {f.name: f.default for f in fields(SwarmConfig)}
    current = {name: values.get(name, default[name])
               for name in ("rollout_fetch_timeout", "coordinator_round_interval", "peer_timeout")}
    fetch = max(current["rollout_fetch_timeout"], 2 * lag + 30)
    if "rollout_fetch_timeout" in explicit:
        fetch = current["rollout_fetch_timeout"]
    waits = {"rollout_fetch_timeout": fetch,
             "coordinator_round_interval": max(current["coordinator_round_interval"], fetch + 3 * lag + 60),
             "peer_timeout": max(current["peer_timeout"], 4 * lag + 60)}
    return {name: value for name, value in waits.items() if name not in explicit}


RESERVED_NODE_IDS = ("coordinator", "supervisor")     # names the shared folder gives to other things
MAX_DRIVE_LAG_S = 3600.0


@dataclass(frozen=True)
class SwarmConfig:
    # Where and what
    gdrive_path: Path = setting(Path("./swarm-drive"), "GDRIVE_PATH", p.local_folder,
        "Shared folder of the swarm (a mounted Google Drive folder on Colab, any directory elsewhere)")
    swarm_url: str | None = setting(None, "SWARM_URL", p.store_url,
        "s3://bucket/prefix or gs://bucket/prefix: the swarm's shared records (state, peers, rollouts, rewards, "
        "metrics) in an object store (pip install -e '.[s3]' or '.[gcs]'; credentials and AWS_ENDPOINT_URL from "
        "the environment); checkpoints, the base model and logs stay under GDRIVE_PATH on this machine")
    experiment_name: str = setting("sapo-gpt2", "EXPERIMENT_NAME", p.safe_name,
        "Experiment folder under <GDRIVE_PATH>/experiments/")
    node_id: str = setting("worker", "NODE_ID", p.safe_name,
        "Name prefix of this machine's workers (worker-1, worker-2, ...)")
    model_name: str | None = setting(None, "MODEL_NAME", p.optional_text,
        "Hugging Face model id, a local folder, or rl-swarm/tiny-gpt2, rl-swarm/gpt2-124m-random; "
        "unset: openai-community/gpt2, else the tiny offline model")
    device: str = setting("auto", "DEVICE", p.device,
        "auto (the workers spread round robin over every visible GPU, else the CPU), cpu, cuda (cuda:0) or "
        "cuda:N (every worker on GPU N)")
    cuda_visible_devices: str | None = setting(None, "CUDA_VISIBLE_DEVICES", p.optional_text,
        "CUDA's own list of the GPUs this host's workers may use (indices or UUIDs); read here so the "
        "monitor reads the same GPUs as the workers")
    cache_dir: Path = setting(Path.home() / ".cache" / "rl-swarm", "RL_SWARM_CACHE", p.path,
        "Where offline models are built once and reused")
    seed: int = setting(42, "SEED", p.Integer(0),
        "Base seed; each worker's questions use SEED + its index", shapes_run=True)
    seeds: tuple[int, ...] = setting((1, 2, 3), "SEEDS", p.seeds,
        "Seeds of `rl-swarm sapo-table`: each split runs once per seed")
    preset: str = setting("default", "PRESET", p.choice(preset_names()),
        "I/J split: default (2/2); paper-8-0, paper-6-2, "
        "paper-4-4, paper-2-6 (the SAPO paper's: 8 workers, G=8, its nine tasks); sapo-4-0, sapo-3-1, "
        "sapo-2-2, sapo-1-3 (the same splits scaled to 4 workers)")
    test_mode: bool = setting(False, "TEST_MODE", p.boolean,
        "Quick validation run: 3 rounds, I=4, G=4, tiny sizes")
    # The swarm and its rounds
    num_workers: int = setting(4, "NUM_WORKERS", p.Integer(1, 64),
        "Worker processes on this machine", shapes_run=True)
    max_rounds: int = setting(2000, "MAX_ROUNDS", p.Integer(1),
        "Rounds the coordinator runs before the swarm stops")
    num_train_samples: int = setting(2, "NUM_TRAIN_SAMPLES", p.Integer(0, 1024),
        "I: local questions per worker per round", shapes_run=True)
    num_transplant_trees: int = setting(2, "NUM_TRANSPLANT_TREES", p.Integer(0, 1024),
        "J: groups taken from other workers' rollouts per round", shapes_run=True)
    num_generations: int = setting(4, "NUM_GENERATIONS", p.Integer(2, 256),
        "G: completions generated per question", shapes_run=True)
    tasks: tuple[tuple[str, float], ...] = setting(p.task_mix("TASKS", DEFAULT_TASKS), "TASKS", p.task_mix,
        "reasoning-gym tasks and weights (task:weight,...)", shapes_run=True)
    coordinator_round_interval: float = setting(120.0, "COORDINATOR_ROUND_INTERVAL",
                                                p.Number(0.1, exclusive=True),
        "Seconds after which the coordinator advances the round even if some workers are not done")
    rollout_fetch_timeout: float = setting(60.0, "ROLLOUT_FETCH_TIMEOUT", p.Number(0),
        "Seconds a worker waits for peers' rollouts of the round before going on with what arrived")
    peer_timeout: float = setting(120.0, "PEER_TIMEOUT", p.Number(1),
        "Seconds without a heartbeat after which a node counts as gone")
    drive_lag: float = setting(0.0, "DRIVE_LAG", p.Number(0, "180", maximum=MAX_DRIVE_LAG_S),
        "Seconds a file written on another machine may take to show up in the shared folder (Drive between Colab "
        "runtimes: minutes); the three waits above, where not set, grow to ride it out; 0: one machine")
    # Generation and training
    max_new_tokens: int = setting(256, "MAX_NEW_TOKENS", p.Integer(1, 4096),
        "Longest completion, in tokens", shapes_run=True)
    temperature: float = setting(1.0, "TEMPERATURE", p.Number(0, exclusive=True),
        "Sampling temperature", shapes_run=True)
    learning_rate: float | None = setting(None, "LEARNING_RATE", p.Number(0, "1e-6", exclusive=True),
        "AdamW learning rate (unset: 1e-6 for GPT-2 124M, 3e-5 for the tiny model)", shapes_run=True)
    advantage_scale: str = setting("std", "ADVANTAGE_SCALE", p.choice(("std", "none")),
        "std: (r - mean) / (std + eps) per group; none: r - mean", shapes_run=True)
    loss_normalization: str = setting("token", "LOSS_NORMALIZATION", p.choice(("token", "sequence")),
        "token: average over every completion token of the batch (DAPO); sequence: per completion, then over "
        "completions (GRPO)", shapes_run=True)
    kl_beta: float = setting(0.0, "KL_BETA", p.Number(0),
        "KL penalty weight (0: no reference model is kept)", shapes_run=True)
    steps_per_round: int = setting(1, "STEPS_PER_ROUND", p.Integer(1, 16),
        "Optimizer steps on each round's batch (GRPO's mu); above 1 the clipped ratio (0.2 / 0.28) bounds "
        "how far the later steps move", shapes_run=True)
    format_reward: float = setting(0.0, "FORMAT_REWARD", p.Number(0, "0.1"),
        "Bonus added to the reward of a completion with a well-formed <answer>...</answer> (0: off; e.g. 0.1 "
        "when starting RL from a raw model)", shapes_run=True)
    checkpoint_interval: int = setting(50, "CHECKPOINT_INTERVAL", p.Integer(1),
        "K: a checkpoint every K rounds")
    train_micro_batch: int = setting(16, "TRAIN_MICRO_BATCH", p.Integer(1, 4096),
        "Completions per forward/backward of the update (gradients accumulate; bounds activation memory)")
    gradient_checkpointing: str = setting("auto", "GRADIENT_CHECKPOINTING", p.choice(("auto", "on", "off")),
        "Recompute activations in backward to save GPU memory: auto = on CUDA, off on CPU")
    update_graphs: str = setting("auto", "UPDATE_GRAPHS", p.choice(("auto", "on", "off")),
        "The update's forward and backward as CUDA graphs, one per bucketed batch shape (STEPS_PER_ROUND=1 and "
        "KL_BETA=0 only): ~2x faster updates for ~0.4-0.9 GiB more a worker. auto = on CUDA where the GPU has "
        "room for them, else eager; on = insist (the fit check counts them); off = always eager")
    decode_cache: str = setting("keep", "DECODE_CACHE", p.choice(("keep", "release")),
        "The sampler's KV cache and CUDA graphs between rounds: keep (no re-capture) or release them before "
        "each update (less GPU memory at the update's peak: ~11 MiB per generated row of 320 positions; the "
        "graphs are captured again next round)")
    warmup_steps: int = setting(400, "WARMUP_STEPS", p.Integer(0),
        "Supervised warm-up steps (question -> <answer>gold</answer>) run once before round 1; 0: none")
    warmup_batch_size: int = setting(32, "WARMUP_BATCH_SIZE", p.Integer(1, 4096),
        "Warm-up batch size")
    warmup_lr: float | None = setting(None, "WARMUP_LR", p.Number(0, "1e-3", exclusive=True),
        "Warm-up learning rate (unset: 1e-3 for the tiny model, 5e-5 otherwise)")
    warmup_target_accuracy: float = setting(0.0, "WARMUP_TARGET_ACCURACY", p.Number(0, "0.3", maximum=1),
        "Stop the warm-up once its held-out greedy exact-match reaches this (0 to 1, checked every 50 steps; "
        "WARMUP_STEPS is then the most steps it takes); 0: always run WARMUP_STEPS")
    # Held-out evaluation
    eval_every: int = setting(50, "EVAL_EVERY", p.Integer(0),
        "Rounds between held-out evaluations (greedy exact-match, written to metrics/<node>/eval.jsonl); "
        "0: only before round 1 and after the last round")
    eval_size: int = setting(100, "EVAL_SIZE", p.Integer(0, 4096),
        "Held-out questions: the same for every node, from a seed no worker trains on; 0: no evaluation",
        shapes_run=True)
    profile_round: int = setting(0, "PROFILE_ROUND", p.Integer(0, example=5),
        "Profile this round of every worker with torch.profiler (time per operator, CPU and GPU) into "
        "logs/<node>/profile-round-N.txt; the profiler slows that round down; 0: off")
    # The shared folder
    rollout_publish_frequency: str = setting("stage", "ROLLOUT_PUBLISH_FREQUENCY",
                                             p.choice(("generation", "stage", "round")),
        "When rollouts are written to the folder: after each generation batch, each stage, or each round")
    rollout_cleanup_enabled: bool = setting(False, "ROLLOUT_CLEANUP_ENABLED", p.boolean,
        "Let the coordinator remove old rounds' rollouts")
    rollout_keep_last_n_rounds: int = setting(10, "ROLLOUT_KEEP_LAST_N_ROUNDS", p.Integer(1),
        "Rounds of rollouts kept when cleanup is on")
    rollout_archive_old: bool = setting(False, "ROLLOUT_ARCHIVE_OLD", p.boolean,
        "Move old rounds to <GDRIVE_PATH>/archives/<EXPERIMENT_NAME>/ instead of deleting them")
    drive_sim_lag: float = setting(0.0, "DRIVE_SIM_LAG", p.Number(0, "5"),
        "For testing: simulate a slow Drive, where a file another process wrote is visible only this many "
        "seconds after its write (needs ROLLOUT_FETCH_TIMEOUT >= 2x and COORDINATOR_ROUND_INTERVAL >= "
        "ROLLOUT_FETCH_TIMEOUT + 3x it); 0: off")
    drive_sim_fail_rate: float = setting(0.0, "DRIVE_SIM_FAIL_RATE", p.Number(0, "0.05", maximum=0.5),
        "For testing: share of shared-folder reads, writes and listings that fail with EIO, as on a flaky "
        "Drive (0 to 0.5); 0: off")
    drive_sim_stale: float = setting(0.0, "DRIVE_SIM_STALE", p.Number(0, "5"),
        "For testing: simulate Drive's stale listings, where a folder's listing is up to this many seconds old "
        "(new files missing from it, deleted ones still in it); it adds to DRIVE_SIM_LAG in the waits it needs; "
        "0: off")
    drive_sim_hangup: Path | None = setting(None, "DRIVE_SIM_HANGUP", p.path,
        "For testing: while a file exists at this path, every shared-folder read, write and listing fails with "
        "ENOTCONN ('Transport endpoint is not connected'), as when Colab's Drive mount hangs up; unset: off")
    # Supervision
    max_restarts: int = setting(5, "MAX_RESTARTS", p.Integer(0),
        "Restarts of one worker within RESTART_WINDOW before "
        "it is marked failed")
    restart_window: float = setting(600.0, "RESTART_WINDOW", p.Number(1),
        "Seconds over which restarts are counted")
    restart_backoff: float = setting(1.0, "RESTART_BACKOFF", p.Number(0),
        "Seconds before the first restart; doubled for each further restart in the window (at most 30 s)")
    worker_hang_timeout: float = setting(900.0, "WORKER_HANG_TIMEOUT", p.Number(5),
        "Seconds a worker may stay in one stage (waiting excepted) before it is killed and restarted")
    memory_high_water: float = setting(0.95, "MEMORY_HIGH_WATER", p.Number(0.05),
        "Share of GPU memory in use above which the dashboard and events.jsonl warn")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, role: str = "up") -> "SwarmConfig":
        """Defaults, then TEST_MODE, then the preset (TEST_MODE's MAX_NEW_TOKENS over a preset's), then every
        variable set explicitly (it always wins)."""
        explicit = {s.attr: s.parse(s.env, env[s.env]) for s in SETTINGS if env.get(s.env, "") != ""}
        values: dict[str, Any] = {}
        if explicit.get("test_mode"):
            values.update(TEST_MODE_VALUES)
        values.update(PRESETS[explicit.get("preset", "default")])
        if explicit.get("test_mode"):       # a preset sets the swarm's shape; the quick run's length still holds
            values["max_new_tokens"] = TEST_MODE_VALUES["max_new_tokens"]
        values.update(explicit)
        values.update(waits_for_lag(values, explicit))
        cfg = cls(**values)
        cfg.check(role)
        return cfg

    def check(self, role: str = "up") -> None:
        """Cross-field rules; `role="join"` allows J>0 with one local worker, since peers run elsewhere."""
        i, j, n = self.num_train_samples, self.num_transplant_trees, self.num_workers
        if i + j == 0:
            raise ConfigError("NUM_TRAIN_SAMPLES=0 and NUM_TRANSPLANT_TREES=0: a round needs at least one "
                              "group to train on (e.g. NUM_TRAIN_SAMPLES=2)")
        if role == "up" and j > 0 and n < 2:
            raise ConfigError(f"NUM_TRANSPLANT_TREES={j} with NUM_WORKERS={n}: external rollouts need at least "
                              "2 workers (set NUM_WORKERS=2 or more, or NUM_TRANSPLANT_TREES=0)")
        if role == "up" and j > (n - 1) * i:
            # each fix named must pass every check: I=0 leaves J no value but 0, which the check above refuses
            enough = f"NUM_TRAIN_SAMPLES={j // (n - 1) + 1} or more"
            if i == 0:
                raise ConfigError(f"NUM_TRAIN_SAMPLES=0 with NUM_TRANSPLANT_TREES={j}: no worker publishes groups "
                                  f"for the others to take; set {enough}")
            raise ConfigError(f"NUM_TRANSPLANT_TREES={j}: the other {n - 1} workers publish only {(n - 1) * i} "
                              f"groups a round (NUM_TRAIN_SAMPLES={i} each); set NUM_TRANSPLANT_TREES <= "
                              f"{(n - 1) * i}, or {enough}")
        if self.warmup_target_accuracy > 0 and self.warmup_steps == 0:
            raise ConfigError(f"WARMUP_TARGET_ACCURACY={self.warmup_target_accuracy:g} with WARMUP_STEPS=0: the "
                              "warm-up is off; set WARMUP_STEPS to the most steps it may take (e.g. WARMUP_STEPS=400)")
        if self.swarm_url and self.rollout_cleanup_enabled and self.rollout_archive_old:
            raise ConfigError("ROLLOUT_ARCHIVE_OLD=true with SWARM_URL: old rounds' rollouts are in the bucket, not "
                              "under GDRIVE_PATH to be moved; set ROLLOUT_ARCHIVE_OLD=false (they are deleted), or "
                              "keep them all with ROLLOUT_CLEANUP_ENABLED=false")
        self._check_drive_lag()
        self._check_update_graphs()
        if self.node_id.lower() in RESERVED_NODE_IDS or self.node_id.lower().startswith("supervisor-"):
            raise ConfigError(f"NODE_ID={self.node_id!r}: the shared folder uses that name for the coordinator and "
                              "the supervisors' logs; pick another NODE_ID (e.g. colab2)")

    def warnings(self) -> list[str]:
        """Settings that run but defeat their purpose; `up` and `config` print them."""
        i, j, n = self.num_train_samples, self.num_transplant_trees, self.num_workers
        if j > 0 and n > 1 and j >= (n - 1) * i:
            return [f"NUM_TRANSPLANT_TREES={j} takes every group the other {n - 1} workers publish (NUM_TRAIN_SAMPLES="
                    f"{i} each): all {n} workers train on the same groups every round, so their models stay alike "
                    f"and the swarm measures no sampling; set NUM_WORKERS={j // max(1, i) + 2} or more, or "
                    f"NUM_TRANSPLANT_TREES < {(n - 1) * i} (the paper-* presets run 8 workers)"]
        return []

    def _check_update_graphs(self) -> None:
        """UPDATE_GRAPHS=on insists on what the graphs cannot hold: one step a round, without the KL term."""
        if self.update_graphs == "on" and not self.graphed_update:
            what = f"KL_BETA={self.kl_beta:g}" if self.kl_beta > 0 else f"STEPS_PER_ROUND={self.steps_per_round}"
            raise ConfigError(f"UPDATE_GRAPHS=on with {what}: the update's CUDA graphs hold one step without the KL "
                              "term; set UPDATE_GRAPHS=auto (graphs where they apply) or off")

    def _check_drive_lag(self) -> None:
        """Under a Drive lag L a peer's rollouts arrive >= L after its publish, and a round is seen done >= 2L
        after it started plus the wait for peers: shorter waits would cut rounds short, not slow them down."""
        lag, fetch = self.drive_sim_lag + self.drive_sim_stale, self.rollout_fetch_timeout
        named = f"DRIVE_SIM_LAG={self.drive_sim_lag:g}" + \
            (f" + DRIVE_SIM_STALE={self.drive_sim_stale:g}" if self.drive_sim_stale else "")
        if lag > 0 and self.num_transplant_trees > 0 and fetch < 2 * lag:
            raise ConfigError(f"{named} with ROLLOUT_FETCH_TIMEOUT={fetch:g}: peers' rollouts show up "
                              f"at least {lag:g}s late; set ROLLOUT_FETCH_TIMEOUT={2 * lag:g} or more")
        if lag > 0 and self.coordinator_round_interval < fetch + 3 * lag:
            raise ConfigError(f"{named} with COORDINATOR_ROUND_INTERVAL="
                              f"{self.coordinator_round_interval:g}: a round is seen done only after the lag three "
                              f"times over plus ROLLOUT_FETCH_TIMEOUT; set COORDINATOR_ROUND_INTERVAL="
                              f"{fetch + 3 * lag:g} or more")

    @property
    def graphed_update(self) -> bool:
        """Whether a worker on CUDA replays its update from CUDA graphs: they hold one step's forward and backward,
        so not with STEPS_PER_ROUND > 1 or the KL term's reference model."""
        return self.update_graphs != "off" and self.steps_per_round == 1 and self.kl_beta == 0

    def with_overrides(self, **changes: Any) -> "SwarmConfig":
        return replace(self, **changes)

    @property
    def experiment_dir(self) -> Path:
        return self.gdrive_path / "experiments" / self.experiment_name

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        out["tasks"] = [[name, weight] for name, weight in self.tasks]
        out["seeds"] = list(self.seeds)
        return out


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.metadata["env"], f.name, f.metadata["parse"], f.metadata["help"], f.metadata["shapes_run"])
    for f in fields(SwarmConfig))
