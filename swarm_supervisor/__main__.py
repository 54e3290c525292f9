"""`python -m swarm_supervisor` is `rl-swarm` (with no command: `up`)."""

import sys

from swarm_supervisor.cli import main, stacks_on_sigusr1

if __name__ == "__main__":
    stacks_on_sigusr1()
    sys.exit(main())
