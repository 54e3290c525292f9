"""`python -m swarm_supervisor` is `rl-swarm` (with no command: `up`)."""

from swarm_supervisor.cli import entry

if __name__ == "__main__":
    entry()
