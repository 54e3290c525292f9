"""Typed configuration of rl-swarm, read once from the environment."""

from configs_env.config import SETTINGS, Setting, SwarmConfig
from configs_env.errors import ConfigError, SwarmError
from configs_env.presets import PRESETS

__all__ = ["ConfigError", "PRESETS", "SETTINGS", "Setting", "SwarmConfig", "SwarmError"]
