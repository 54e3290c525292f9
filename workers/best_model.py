"""The model of a node's best held-out evaluation, kept as checkpoints/<node>/best/ beside its checkpoints: weights
and a meta.json the node signs, never resumed from."""

import logging
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from workers.paced_files import save_safetensors

from workers.checkpoint import SCHEMA, own_folder, write_signed_meta
from workers.shared_folder.json_records import read_json_bounded
from workers.shared_folder.leftovers import make_temp_dir, swap_in
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.safe_io import sync_folder
from workers.shared_folder.signing import NodeKey, file_sha256
from workers.weights import host_weights

log = logging.getLogger(__name__)

BEST = "best"             # checkpoints/<node>/best/: the model of the node's best held-out evaluation
BEST_WEIGHTS = "model.safetensors"


def save_best(root: Path, key: NodeKey, model_name: str, round_: int, accuracy: float,
              weights: dict[str, torch.Tensor]) -> Path:
    """The model of the node's best held-out evaluation (`weights`, from host_weights), as root/best/ (weights and
    meta.json, signed by the node's `key` with the weights' SHA-256; never resumed from).

    Written beside the old best and swapped in by renames, so a crash leaves one whole best model, old or new.
    """
    own_folder(root)
    final = root / BEST
    tmp = make_temp_dir(final)
    try:
        save_safetensors(weights, tmp / BEST_WEIGHTS, metadata={"format": "pt"})
        write_signed_meta(tmp, {"schema": SCHEMA, "node": key.node, "model_name": model_name, "round": round_,
                                 "held_out_accuracy": accuracy}, (BEST_WEIGHTS,), key)
        swap_in(tmp, final)
        sync_folder(root)
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"best model of round {round_} not written: {str(exc).splitlines()[0][:200]}") from exc
    return final


def read_best(root: Path, key: NodeKey) -> dict[str, Any] | None:
    """best/meta.json when the node (`key`) signed it, beside the model it signed for: {"round",
    "held_out_accuracy", ...}; None when there is none, or none of the node's. checkpoints/<node>/ is in the shared
    folder: a score a peer wrote there (say 100%) would stop every save of the node's best model."""
    path = root / BEST / "meta.json"
    try:
        record = key.verify(read_json_bounded(path, max_bytes=64 * 1024), str(path))
        files = record.get("files")
        if record.get("node") != key.node or not isinstance(files, dict) or \
                files.get(BEST_WEIGHTS) != file_sha256(root / BEST / BEST_WEIGHTS):
            raise RejectedFile(f"{root / BEST}: its model is not the one its meta.json signed for")
    except FileNotFoundError:
        return None
    except RejectedFile as refused:     # unsigned ones too: a score from before signed best models is not proof
        log.warning("%s; not this node's best: its next evaluation saves the best model over it", refused)
        return None
    except OSError as exc:
        log.warning("%s not read (%s); its next evaluation saves the best model over it", path, exc)
        return None
    accuracy = record.get("held_out_accuracy")
    if not isinstance(record.get("round"), int) or isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)):
        return None
    return record


class BestModel:
    """Keeps root/best/ at the node's best held-out evaluation so far (round 0, the start, included)."""

    def __init__(self, root: Path, key: NodeKey, model_name: str):
        self.root, self.key, self.model_name = root, key, model_name
        meta = read_best(root, key)
        self.written: float | None = float(meta["held_out_accuracy"]) if meta else None   # what best/ holds
        self.accuracy = self.written            # the best offered: written, or being written
        self._offered: dict[int, float] = {}

    def offer(self, round_: int, accuracy: float, model: torch.nn.Module) -> Callable[[], Path] | None:
        """When `accuracy` beats every earlier evaluation, the write that saves the model as best (its weights
        copied now, so training may go on before it runs); report its outcome to `landed`."""
        if self.accuracy is not None and accuracy <= self.accuracy:
            return None
        self.accuracy, self._offered[round_] = accuracy, accuracy
        return partial(save_best, self.root, self.key, self.model_name, round_, accuracy, host_weights(model))

    def landed(self, round_: int, ok: bool) -> None:
        """The write of round_'s offer ended; one that failed leaves the next better evaluation to try again."""
        accuracy = self._offered.pop(round_, None)
        if accuracy is None:
            return
        if ok:
            self.written = accuracy if self.written is None else max(self.written, accuracy)
        offered = [self.written, *self._offered.values()]
        self.accuracy = max((a for a in offered if a is not None), default=None)
