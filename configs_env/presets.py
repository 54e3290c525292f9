"""Presets: named bundles of values that sit between the defaults and explicitly set variables."""

from typing import Any

# The seeds' 5-node GPT-2 swarm is the default: 1 coordinator + 4 workers, I=2, J=2, G=4, 2000 rounds.
# The SAPO paper runs 8 agents with I+J=8 (8/0, 6/2, 4/4, 2/6); scaled to 4 workers that is I+J=4.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "sapo-4-0": {"num_train_samples": 4, "num_transplant_trees": 0},
    "sapo-3-1": {"num_train_samples": 3, "num_transplant_trees": 1},
    "sapo-2-2": {"num_train_samples": 2, "num_transplant_trees": 2},
    "sapo-1-3": {"num_train_samples": 1, "num_transplant_trees": 3},
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
