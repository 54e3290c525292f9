"""The experiment's warmed-up base (base/ in the folder) as a reader sees it: its meta.json, read without loading
the learning code that makes the base (workers.warmup)."""

import logging
from pathlib import Path

from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import read_json_bounded
from workers.shared_folder.rejections import RejectedFile

log = logging.getLogger(__name__)

BASE_META_SCHEMA = 1     # base/meta.json's own version (the warm-up's report), apart from protocol.SCHEMA


def read_base_meta(experiment_root: Path) -> dict | None:
    """The base's meta.json; None when there is no base, or its meta is unreadable (the base is then rebuilt)."""
    path = ExperimentFolder(experiment_root).base_dir / "meta.json"
    try:
        return read_json_bounded(path, max_bytes=64 * 1024)
    except FileNotFoundError:
        return None
    except RejectedFile as error:
        log.warning("%s; the base will be rebuilt", error)
        return None
