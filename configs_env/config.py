"""The swarm's settings: read from the environment once, validated in one place, frozen."""

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from configs_env import parsing as p
from configs_env.errors import ConfigError
from configs_env.presets import PRESETS, TEST_MODE_VALUES, preset_names

DEFAULT_TASKS = "chain_sum:1,basic_arithmetic:1"


@dataclass(frozen=True)
class Setting:
    """One knob: the environment variable, the parser, and the help line the README and --help show."""

    env: str
    attr: str
    parse: p.Parser
    help: str


@dataclass(frozen=True)
class SwarmConfig:
    # Where and what
    gdrive_path: Path = Path("./swarm-drive")
    experiment_name: str = "sapo-gpt2"
    node_id: str = "worker"
    model_name: str | None = None
    device: str = "auto"
    cache_dir: Path = Path.home() / ".cache" / "rl-swarm"
    seed: int = 42
    seeds: tuple[int, ...] = (1, 2, 3)    # `rl-swarm sapo-table` runs every split once per seed
    preset: str = "default"
    test_mode: bool = False
    # The swarm and its rounds
    num_workers: int = 4
    max_rounds: int = 2000
    num_train_samples: int = 2          # I: local questions per round
    num_transplant_trees: int = 2       # J: external groups taken from peers per round
    num_generations: int = 4            # G: completions per question
    tasks: tuple[tuple[str, float], ...] = p.task_mix("TASKS", DEFAULT_TASKS)
    coordinator_round_interval: float = 120.0
    rollout_fetch_timeout: float = 60.0
    peer_timeout: float = 120.0
    # Generation and training
    max_new_tokens: int = 256
    temperature: float = 1.0
    learning_rate: float | None = None   # None: the model's own default (workers.learning.model)
    advantage_scale: str = "std"
    loss_normalization: str = "token"
    kl_beta: float = 0.0
    steps_per_round: int = 1             # mu: optimizer steps on each round's batch (> 1: the PPO clip acts)
    format_reward: float = 0.0          # added to the reward of a well-formed <answer> tag; for raw models
    checkpoint_interval: int = 50
    train_micro_batch: int = 16          # rows per forward/backward; gradients accumulate over the round
    gradient_checkpointing: str = "auto"  # recompute activations in backward: auto = on CUDA only
    warmup_steps: int = 400
    warmup_batch_size: int = 32
    warmup_lr: float | None = None       # None: 1e-3 for the tiny model, 5e-5 otherwise
    warmup_target_accuracy: float = 0.0  # stop the warm-up once held-out greedy accuracy reaches it (0: off)
    # Held-out evaluation
    eval_every: int = 50                 # rounds between held-out evaluations (0: start and end only)
    eval_size: int = 100                 # held-out questions (0: no evaluation)
    # The shared folder
    rollout_publish_frequency: str = "stage"
    rollout_cleanup_enabled: bool = False
    rollout_keep_last_n_rounds: int = 10
    rollout_archive_old: bool = False
    drive_sim_lag: float = 0.0           # testing only: others' new files show up this many seconds late
    drive_sim_fail_rate: float = 0.0     # testing only: share of folder operations that fail with EIO
    # Supervision
    max_restarts: int = 5
    restart_window: float = 600.0
    restart_backoff: float = 1.0
    worker_hang_timeout: float = 900.0
    memory_high_water: float = 0.95

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, role: str = "up") -> "SwarmConfig":
        """Defaults, then TEST_MODE, then the preset, then every variable set explicitly (it always wins)."""
        explicit = {s.attr: s.parse(s.env, env[s.env]) for s in SETTINGS if env.get(s.env, "") != ""}
        values: dict[str, Any] = {}
        if explicit.get("test_mode"):
            values.update(TEST_MODE_VALUES)
        values.update(PRESETS[explicit.get("preset", "default")])
        values.update(explicit)
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
            raise ConfigError(f"NUM_TRANSPLANT_TREES={j}: the other {n - 1} workers publish only {(n - 1) * i} "
                              f"groups a round (NUM_TRAIN_SAMPLES={i} each); set NUM_TRANSPLANT_TREES <= {(n - 1) * i}")
        if self.warmup_target_accuracy > 0 and self.warmup_steps == 0:
            raise ConfigError(f"WARMUP_TARGET_ACCURACY={self.warmup_target_accuracy:g} with WARMUP_STEPS=0: the "
                              "warm-up is off; set WARMUP_STEPS to the most steps it may take (e.g. WARMUP_STEPS=400)")
        self._check_drive_lag()

    def warnings(self) -> list[str]:
        """Settings that run but defeat their purpose; `up` and `config` print them."""
        i, j, n = self.num_train_samples, self.num_transplant_trees, self.num_workers
        if j > 0 and n > 1 and j >= (n - 1) * i:
            return [f"NUM_TRANSPLANT_TREES={j} takes every group the other {n - 1} workers publish (NUM_TRAIN_SAMPLES="
                    f"{i} each): all {n} workers train on the same groups every round, so their models stay alike "
                    f"and the swarm measures no sampling; set NUM_WORKERS={j // max(1, i) + 2} or more, or "
                    f"NUM_TRANSPLANT_TREES < {(n - 1) * i} (the paper-* presets run 8 workers)"]
        return []

    def _check_drive_lag(self) -> None:
        """Under a Drive lag L a peer's rollouts arrive >= L after its publish, and a round is seen done >= 2L
        after it started plus the wait for peers: shorter waits would cut rounds short, not slow them down."""
        lag, fetch = self.drive_sim_lag, self.rollout_fetch_timeout
        if lag > 0 and self.num_transplant_trees > 0 and fetch < 2 * lag:
            raise ConfigError(f"DRIVE_SIM_LAG={lag:g} with ROLLOUT_FETCH_TIMEOUT={fetch:g}: peers' rollouts show up "
                              f"at least {lag:g}s late; set ROLLOUT_FETCH_TIMEOUT={2 * lag:g} or more")
        if lag > 0 and self.coordinator_round_interval < fetch + 3 * lag:
            raise ConfigError(f"DRIVE_SIM_LAG={lag:g} with COORDINATOR_ROUND_INTERVAL="
                              f"{self.coordinator_round_interval:g}: a round is seen done only after the lag three "
                              f"times over plus ROLLOUT_FETCH_TIMEOUT; set COORDINATOR_ROUND_INTERVAL="
                              f"{fetch + 3 * lag:g} or more")

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


SETTINGS: tuple[Setting, ...] = (
    Setting("GDRIVE_PATH", "gdrive_path", lambda n, r: Path(p.text(n, r)).expanduser(),
            "Shared folder of the swarm (a mounted Google Drive folder on Colab, any directory elsewhere)"),
    Setting("EXPERIMENT_NAME", "experiment_name", p.safe_name, "Experiment folder under <GDRIVE_PATH>/experiments/"),
    Setting("NODE_ID", "node_id", p.safe_name, "Name prefix of this machine's workers (worker-1, worker-2, ...)"),
    Setting("MODEL_NAME", "model_name", p.optional_text,
            "Hugging Face model id, a local folder, or rl-swarm/tiny-gpt2, rl-swarm/gpt2-124m-random; "
            "unset: openai-community/gpt2, else the tiny offline model"),
    Setting("DEVICE", "device", p.device, "auto (cuda:0 when present), cpu, cuda or cuda:N"),
    Setting("RL_SWARM_CACHE", "cache_dir", lambda n, r: Path(p.text(n, r)).expanduser(),
            "Where offline models are built once and reused"),
    Setting("SEED", "seed", p.integer(0), "Base seed; each worker's questions use SEED + its index"),
    Setting("SEEDS", "seeds", p.seeds, "Seeds of `rl-swarm sapo-table`: each split runs once per seed"),
    Setting("PRESET", "preset", p.choice(preset_names()), "I/J split: default (2/2); paper-8-0, paper-6-2, "
            "paper-4-4, paper-2-6 (the SAPO paper's: 8 workers, G=8, its nine tasks); sapo-4-0, sapo-3-1, "
            "sapo-2-2, sapo-1-3 (the same splits scaled to 4 workers)"),
    Setting("TEST_MODE", "test_mode", p.boolean, "Quick validation run: 3 rounds, I=4, G=4, tiny sizes"),
    Setting("NUM_WORKERS", "num_workers", p.integer(1, 64, example=4), "Worker processes on this machine"),
    Setting("MAX_ROUNDS", "max_rounds", p.integer(1, example=2000),
            "Rounds the coordinator runs before the swarm stops"),
    Setting("NUM_TRAIN_SAMPLES", "num_train_samples", p.integer(0, 1024, example=2),
            "I: local questions per worker per round"),
    Setting("NUM_TRANSPLANT_TREES", "num_transplant_trees", p.integer(0, 1024, example=2),
            "J: groups taken from other workers' rollouts per round"),
    Setting("NUM_GENERATIONS", "num_generations", p.integer(2, 256, example=4),
            "G: completions generated per question"),
    Setting("TASKS", "tasks", p.task_mix, "reasoning-gym tasks and weights (task:weight,...)"),
    Setting("COORDINATOR_ROUND_INTERVAL", "coordinator_round_interval", p.number(0.1, "120", exclusive=True),
            "Seconds after which the coordinator advances the round even if some workers are not done"),
    Setting("ROLLOUT_FETCH_TIMEOUT", "rollout_fetch_timeout", p.number(0, "60"),
            "Seconds a worker waits for peers' rollouts of the round before going on with what arrived"),
    Setting("PEER_TIMEOUT", "peer_timeout", p.number(1, "120"),
            "Seconds without a heartbeat after which a node counts as gone"),
    Setting("MAX_NEW_TOKENS", "max_new_tokens", p.integer(1, 4096), "Longest completion, in tokens"),
    Setting("TEMPERATURE", "temperature", p.number(0, "1.0", exclusive=True), "Sampling temperature"),
    Setting("LEARNING_RATE", "learning_rate", p.number(0, "3e-6", exclusive=True),
            "AdamW learning rate (unset: 3e-6 for GPT-2 124M, 3e-5 for the tiny model)"),
    Setting("ADVANTAGE_SCALE", "advantage_scale", p.choice(("std", "none")),
            "std: (r - mean) / (std + eps) per group; none: r - mean"),
    Setting("LOSS_NORMALIZATION", "loss_normalization", p.choice(("token", "sequence")),
            "token: average over every completion token of the batch (DAPO); sequence: per completion, then over "
            "completions (GRPO)"),
    Setting("KL_BETA", "kl_beta", p.number(0, "0.0"), "KL penalty weight (0: no reference model is kept)"),
    Setting("STEPS_PER_ROUND", "steps_per_round", p.integer(1, 16, example=1),
            "Optimizer steps on each round's batch (GRPO's mu); above 1 the clipped ratio (0.2 / 0.28) bounds "
            "how far the later steps move"),
    Setting("FORMAT_REWARD", "format_reward", p.number(0, "0.1"),
            "Bonus added to the reward of a completion with a well-formed <answer>...</answer> (0: off; e.g. 0.1 "
            "when starting RL from a raw model)"),
    Setting("TRAIN_MICRO_BATCH", "train_micro_batch", p.integer(1, 4096, example=16),
            "Completions per forward/backward of the update (gradients accumulate; bounds activation memory)"),
    Setting("GRADIENT_CHECKPOINTING", "gradient_checkpointing", p.choice(("auto", "on", "off")),
            "Recompute activations in backward to save GPU memory: auto = on CUDA, off on CPU"),
    Setting("CHECKPOINT_INTERVAL", "checkpoint_interval", p.integer(1), "K: a checkpoint every K rounds"),
    Setting("WARMUP_STEPS", "warmup_steps", p.integer(0, example=400),
            "Supervised warm-up steps (question -> <answer>gold</answer>) run once before round 1; 0: none"),
    Setting("WARMUP_BATCH_SIZE", "warmup_batch_size", p.integer(1, 4096, example=32), "Warm-up batch size"),
    Setting("WARMUP_LR", "warmup_lr", p.number(0, "1e-3", exclusive=True),
            "Warm-up learning rate (unset: 1e-3 for the tiny model, 5e-5 otherwise)"),
    Setting("WARMUP_TARGET_ACCURACY", "warmup_target_accuracy", p.number(0, "0.3", maximum=1),
            "Stop the warm-up once its held-out greedy exact-match reaches this (0 to 1, checked every 50 steps; "
            "WARMUP_STEPS is then the most steps it takes); 0: always run WARMUP_STEPS"),
    Setting("EVAL_EVERY", "eval_every", p.integer(0, example=50),
            "Rounds between held-out evaluations (greedy exact-match, written to metrics/<node>/eval.jsonl); "
            "0: only before round 1 and after the last round"),
    Setting("EVAL_SIZE", "eval_size", p.integer(0, 4096, example=100),
            "Held-out questions: the same for every node, from a seed no worker trains on; 0: no evaluation"),
    Setting("ROLLOUT_PUBLISH_FREQUENCY", "rollout_publish_frequency", p.choice(("generation", "stage", "round")),
            "When rollouts are written to the folder: after each generation batch, each stage, or each round"),
    Setting("ROLLOUT_CLEANUP_ENABLED", "rollout_cleanup_enabled", p.boolean,
            "Let the coordinator remove old rounds' rollouts"),
    Setting("ROLLOUT_KEEP_LAST_N_ROUNDS", "rollout_keep_last_n_rounds", p.integer(1),
            "Rounds of rollouts kept when cleanup is on"),
    Setting("ROLLOUT_ARCHIVE_OLD", "rollout_archive_old", p.boolean,
            "Move old rounds to <GDRIVE_PATH>/archives/<EXPERIMENT_NAME>/ instead of deleting them"),
    Setting("DRIVE_SIM_LAG", "drive_sim_lag", p.number(0, "5"),
            "For testing: simulate a slow Drive, where a file another process wrote is visible only this many "
            "seconds after its write (needs ROLLOUT_FETCH_TIMEOUT >= 2x and COORDINATOR_ROUND_INTERVAL >= "
            "ROLLOUT_FETCH_TIMEOUT + 3x it); 0: off"),
    Setting("DRIVE_SIM_FAIL_RATE", "drive_sim_fail_rate", p.number(0, "0.05", maximum=0.5),
            "For testing: share of shared-folder reads, writes and listings that fail with EIO, as on a flaky "
            "Drive (0 to 0.5); 0: off"),
    Setting("MAX_RESTARTS", "max_restarts", p.integer(0), "Restarts of one worker within RESTART_WINDOW before "
            "it is marked failed"),
    Setting("RESTART_WINDOW", "restart_window", p.number(1, "600"), "Seconds over which restarts are counted"),
    Setting("RESTART_BACKOFF", "restart_backoff", p.number(0, "1"),
            "Seconds before the first restart; doubled for each further restart in the window (at most 30 s)"),
    Setting("MEMORY_HIGH_WATER", "memory_high_water", p.number(0.05, "0.95"),
            "Share of GPU memory in use above which the dashboard and events.jsonl warn"),
    Setting("WORKER_HANG_TIMEOUT", "worker_hang_timeout", p.number(5, "900"),
            "Seconds a worker may stay in one stage (waiting excepted) before it is killed and restarted"),
)

_defaults = {f.name for f in fields(SwarmConfig)}
assert all(s.attr in _defaults for s in SETTINGS), "every Setting must name a SwarmConfig field"
