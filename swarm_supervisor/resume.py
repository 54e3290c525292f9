"""Starting an experiment again: whether rounds are left to run."""

from configs_env import SwarmConfig, SwarmError
from workers.shared_folder.exchange import read_finished
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.signing import KeyRing


class ExperimentFinished(SwarmError):
    """A machine asked to join an experiment whose coordinator already ran all its rounds."""


def finished_note(folder: ExperimentFolder, keyring: KeyRing, cfg: SwarmConfig, joining: bool = False) -> str | None:
    """Why the experiment has no round left to run (its coordinator's signed finished.json covers MAX_ROUNDS), or
    None. A joining machine's own MAX_ROUNDS does not count: only its coordinator runs rounds, and it has ended."""
    finished = read_finished(folder, keyring)
    if finished is None or not (joining or finished.covers(cfg.max_rounds)):
        return None
    fix = "its `rl-swarm up` continues it with a raised MAX_ROUNDS (join then)" if joining else \
        "raise MAX_ROUNDS to continue it"
    return f"experiment {cfg.experiment_name!r} already finished its {finished.rounds} rounds; {fix}, or set a new " \
           "EXPERIMENT_NAME"
