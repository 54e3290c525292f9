"""Presets: named bundles of values that sit between the defaults and explicitly set variables."""

from typing import Any

# The nine reasoning-gym tasks of the SAPO paper's public swarm (arXiv:2509.08721, Sec. 4), equal weights.
PAPER_TASKS: tuple[tuple[str, float], ...] = tuple((name, 1.0) for name in (
    "arc_1d", "basic_arithmetic", "base_conversion", "bf", "binary_matrix", "calendar_arithmetic",
    "decimal_arithmetic", "fraction_simplification", "propositional_logic"))
# The paper's four configurations (8 agents, G=8, I local + J external = 8) and its cumulative reward for each:
# the sum over 2000 rounds of the agents' mean reward, Qwen2.5-0.5B (Sec. 5, Table 1).
PAPER_SPLITS: tuple[tuple[int, int], ...] = ((8, 0), (6, 2), (4, 4), (2, 6))
PAPER_CUMULATIVE_REWARD: dict[str, float] = {"8/0": 561.8, "6/2": 854.4, "4/4": 1093.3, "2/6": 945.9}
# The longest gold answer of the nine tasks, `<answer>` tags and EOS included, is 115 GPT-2 tokens (binary_matrix;
# the others need 7-36): 128 new tokens fit every answer, and a policy that rambles costs half of 256's
PAPER_MAX_NEW_TOKENS = 128

# The seeds' 5-node GPT-2 swarm is the default: 1 coordinator + 4 workers, I=2, J=2, G=4, 2000 rounds.
# sapo-*: the paper's splits scaled to 4 workers (I+J=4). With 4 workers, sapo-1-3's J=3 takes every group the
# other three publish, so every worker trains on the same groups (SwarmConfig.warnings says so); paper-* keep
# the paper's 8 workers, where 2/6 takes 6 of the 14 groups its peers publish.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "sapo-4-0": {"num_train_samples": 4, "num_transplant_trees": 0},
    "sapo-3-1": {"num_train_samples": 3, "num_transplant_trees": 1},
    "sapo-2-2": {"num_train_samples": 2, "num_transplant_trees": 2},
    "sapo-1-3": {"num_train_samples": 1, "num_transplant_trees": 3},
    **{f"paper-{i}-{j}": {"num_workers": 8, "num_generations": 8, "num_train_samples": i, "num_transplant_trees": j,
                          "tasks": PAPER_TASKS, "kl_beta": 0.0, "max_new_tokens": PAPER_MAX_NEW_TOKENS}
       for i, j in PAPER_SPLITS},
}
# the rows of `rl-swarm sapo-table`, by preset family, in the paper's order (no sharing first)
TABLE_FAMILIES: dict[str, tuple[str, ...]] = {
    "paper": tuple(f"paper-{i}-{j}" for i, j in PAPER_SPLITS),
    "sapo": ("sapo-4-0", "sapo-3-1", "sapo-2-2", "sapo-1-3"),
}

# TEST_MODE: the quick validation run (3 rounds, I=4, G=4) that takes about a minute on 2 CPU cores.
TEST_MODE_VALUES: dict[str, Any] = {
    "max_rounds": 3,
    "num_train_samples": 4,
    "num_generations": 4,
    "max_new_tokens": 32,
    "coordinator_round_interval": 60.0,
    "rollout_fetch_timeout": 20.0,
    "checkpoint_interval": 1,
    "warmup_steps": 150,
    "eval_every": 0,                # held-out evaluation at start and end only
    "eval_size": 32,
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)
