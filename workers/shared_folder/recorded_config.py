"""config.json of an experiment: the settings its coordinator's last `up` runs with, signed by that coordinator (a
resume keeps the first start's time and what it changed: swarm_supervisor/resume.py).

No worker reads it; `up` compares a resume's settings with it, a joining machine takes the settings that shape the
rounds from it (as advice: each through its setting's parser), the views show it (the model, MAX_ROUNDS, the
split) and `rl-swarm validate` decides by it (EVAL_SIZE=0 asks for no held-out evaluation, ROLLOUT_CLEANUP_ENABLED
retires rollouts on purpose). A peer can write the folder, so only a config.json the coordinator signed counts; an
unsigned one only in a folder from before signed records (KeyRing.for_viewing).
"""

from typing import Any

from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import read_json_bounded, write_json_atomic
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey

CONFIG_BYTES = 256 * 1024
# the lease instance of the `up` that wrote it: a joiner takes the settings of the coordinator that runs now, not
# those a run before it left (a resume may change them)
COORDINATOR_INSTANCE = "coordinator_instance"


def write_recorded_config(folder: ExperimentFolder, record: dict[str, Any], key: NodeKey) -> None:
    """config.json, signed by the experiment's coordinator `key`."""
    write_json_atomic(folder.config_file, key.sign(record))


def read_recorded_config(folder: ExperimentFolder, keyring: KeyRing) -> dict[str, Any]:
    """The config.json the experiment's coordinator signed; RejectedFile, one line naming the file and the fix,
    for one it did not sign (or an unreadable one); FileNotFoundError when there is none, OSError for a Drive
    hiccup."""
    path = folder.config_file
    try:
        return keyring.verify(read_json_bounded(path, max_bytes=CONFIG_BYTES), COORDINATOR, str(path))
    except RejectedFile as error:
        why = str(error).removeprefix(f"{path}: ").removesuffix("; skipped")
        raise RejectedFile(f"{path}: not the experiment's coordinator's ({why}), so none of its settings is "
                           "trusted; the next `rl-swarm up` of the experiment on its coordinator's machine writes "
                           "a signed one") from error
