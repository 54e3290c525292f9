"""The one error hierarchy users see: every message is a single line naming the thing and the fix."""


class SwarmError(Exception):
    """Base of every error rl-swarm reports to a user in one line."""


class ConfigError(SwarmError):
    """A setting from the environment is missing, malformed or inconsistent."""
