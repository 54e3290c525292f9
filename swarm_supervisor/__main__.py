"""`python -m swarm_supervisor` is `rl-swarm` (with no command: `up`)."""

import sys

from swarm_supervisor.cli import main

if __name__ == "__main__":
    sys.exit(main())
