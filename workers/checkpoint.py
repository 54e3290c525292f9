"""Checkpoints of one worker: model weights (safetensors), optimizer and RNG state, and a meta file written last."""

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from configs_env import SwarmError
from workers.folder import RejectedFile, read_json_bounded

log = logging.getLogger(__name__)

KEEP_LAST = 2


@dataclass(frozen=True)
class CheckpointMeta:
    round: int
    node: str
    model_name: str


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, meta: CheckpointMeta, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> Path:
    """Write into a temp folder, fsync, then rename: a crash leaves the previous checkpoint intact."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{meta.round:06d}"
    tmp = root / f".round_{meta.round:06d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    # weights_only=True can read this back: tensors, numbers and plain containers only, no pickled objects
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    with open(tmp / "meta.json", "w", encoding="utf-8") as f:
        json.dump({"schema": 1, "round": meta.round, "node": meta.node, "model_name": meta.model_name,
                   "python_rng": _python_rng_state()}, f)
    for name in ("model.safetensors", "state.pt", "meta.json"):
        _fsync_file(tmp / name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root)
    return final


def _python_rng_state() -> list[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _prune(root: Path) -> None:
    for old in sorted(root.glob("round_*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointMismatch(SwarmError):
    """The experiment's checkpoints were made with another model than the one asked for."""


def load_latest_checkpoint(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           model_name: str) -> CheckpointMeta | None:
    """Restore the newest complete checkpoint; incomplete or corrupt ones are skipped with a warning."""
    if not root.exists():
        return None
    for folder in sorted(root.glob("round_*"), reverse=True):
        try:
            record = read_json_bounded(folder / "meta.json", max_bytes=1024 * 1024)
            if not isinstance(record.get("round"), int) or not isinstance(record.get("model_name"), str):
                raise RejectedFile(f"{folder / 'meta.json'}: missing round or model_name")
            if record["model_name"] != model_name:
                raise CheckpointMismatch(
                    f"{folder} was trained from MODEL_NAME={record['model_name']!r}, not {model_name!r}: "
                    f"set MODEL_NAME={record['model_name']} to resume, or use a new EXPERIMENT_NAME")
            load_model(model, str(folder / "model.safetensors"), device=str(next(model.parameters()).device))
            state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            rng = record.get("python_rng")
            if isinstance(rng, list) and len(rng) == 3:
                random.setstate((rng[0], tuple(rng[1]), rng[2]))
            return CheckpointMeta(round=record["round"], node=str(record.get("node", "")),
                                  model_name=record["model_name"])
        except (FileNotFoundError, RejectedFile, SafetensorError, RuntimeError, KeyError, ValueError, OSError) as exc:
            log.warning("checkpoint %s is unusable (%s); trying an older one", folder, str(exc).splitlines()[0][:200])
    return None
