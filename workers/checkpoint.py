"""Checkpoints of one worker: model weights (safetensors), optimizer and RNG state, and a meta file written last.

Nothing here is unpickled: weights are safetensors, state.pt holds only tensors and plain containers
(torch.load(weights_only=True)), and meta.json is JSON. There is no data cursor beyond the round:
a worker's questions come from round_seed(cfg, index, round) (workers/round_loop.py) and its sampling
re-seeds from it, so restoring the round restores where the worker is in its data.
"""

import io
import json
import logging
import pickle
import random
import shutil
from collections.abc import Callable
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from workers.paced_files import PacedFile, save_safetensors

from configs_env import SwarmError
from workers.disk_need import KEEP_LAST
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import SIGNATURE_KEY, read_json_bounded, write_json_atomic
from workers.shared_folder.jsonl import append_jsonl, read_jsonl
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.retries import with_retries
from workers.shared_folder.safe_io import _folder, is_visible, list_folder, sync_folder
from workers.shared_folder.leftovers import make_temp_dir, remove_stale_temps, swap_in
from workers.shared_folder.protocol import RoundMetrics
from workers.shared_folder.signing import KeyRing, NodeKey, file_sha256, signed_lines
from workers.host_copies import HostCopies
from workers.weights import SLACK_BYTES, load_weights, model_bytes, read_checked, weight_tensors

log = logging.getLogger(__name__)

METRICS_TAIL = 8          # this node's last metrics rows kept in each checkpoint (bounded: meta.json stays small)
SCHEMA = 3                # 3: meta.json signed by the node, with its files' SHA-256; 1 and 2 unsigned (see load)
FILES = ("model.safetensors", "state.pt")
STATE_SIZES = 8           # state.pt is refused unread beyond 8 models' size (AdamW's moments, fp32 masters, RNGs)


@dataclass(frozen=True)
class CheckpointMeta:
    round: int
    node: str
    model_name: str
    # the node's latest rounds, oldest first: a resumed worker knows its recent results, and can rewrite
    # the rewards file or metrics line its previous process did not get to
    metrics_tail: tuple[RoundMetrics, ...] = ()


def _nothing_to_release() -> None:
    pass


@dataclass(frozen=True)
class CheckpointSnapshot:
    """A checkpoint copied to host memory: its write, in any thread and later, reads nothing training changes."""

    meta: CheckpointMeta
    weights: dict[str, torch.Tensor]      # model.safetensors: one name per storage (GPT-2's lm_head is its wte)
    state: dict[str, Any]                 # state.pt: the optimizer's state and torch's RNGs
    record: dict[str, Any]                # meta.json
    release: Callable[[], None] = _nothing_to_release     # the host copies' memory, once nothing reads them


def snapshot_checkpoint(meta: CheckpointMeta, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        copies: HostCopies | None = None) -> CheckpointSnapshot:
    """Everything a checkpoint holds, taken now: weights, optimizer state and every RNG; copied into `copies`
    (new host memory without), which the snapshot's release hands back once its write has ended."""
    copies = HostCopies(keep=0) if copies is None else copies
    (weights, optimizer_state), release = copies.copy((weight_tensors(model), optimizer.state_dict()))
    # weights_only=True can read state.pt back: tensors, numbers and plain containers only, no pickled objects
    state = {"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()}
    # only when this process already uses CUDA: asking an idle GPU for its RNG would create a context there
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    record = {"schema": SCHEMA, "round": meta.round, "node": meta.node, "model_name": meta.model_name,
              "python_rng": _python_rng_state(), "numpy_rng": _numpy_rng_state(),
              "metrics_tail": [m.to_json() for m in meta.metrics_tail[-METRICS_TAIL:]]}
    return CheckpointSnapshot(meta, weights, state, record, release)


def save_checkpoint(root: Path, meta: CheckpointMeta, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, key: NodeKey) -> Path:
    """A checkpoint of the model and optimizer as they are, written before returning (see write_checkpoint)."""
    return write_checkpoint(root, snapshot_checkpoint(meta, model, optimizer), key)


def write_checkpoint(root: Path, snapshot: CheckpointSnapshot, key: NodeKey) -> Path:
    """Write into a temp folder, fsync, then rename: a crash leaves the previous checkpoint intact. meta.json,
    written last, is signed by the node's `key` and holds the SHA-256 of the other files: the checkpoint folder
    is in the shared folder, and a checkpoint a peer planted must never be resumed from.

    Any failure to write is an OSError (torch and safetensors report a full or failing disk as their own
    errors), and leaves no temp folder behind: each would hold a whole model.
    """
    own_folder(root)
    round_ = snapshot.meta.round
    tmp = make_temp_dir(root / f"round_{round_:06d}")
    try:
        return _write_checkpoint(root, tmp, snapshot, key)
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise
        raise OSError(f"checkpoint of round {round_} not written: {str(exc).splitlines()[0][:200]}") from exc


def _write_checkpoint(root: Path, tmp: Path, snapshot: CheckpointSnapshot, key: NodeKey) -> Path:
    final = root / f"round_{snapshot.meta.round:06d}"
    save_safetensors(snapshot.weights, tmp / "model.safetensors", metadata={"format": "pt"})
    with PacedFile(tmp / "state.pt") as f:
        torch.save(snapshot.state, f)
    write_signed_meta(tmp, snapshot.record, FILES, key)
    swap_in(tmp, final)         # a round saved twice: the first stays whole until the second is in place
    sync_folder(root)           # the rename outlives a power cut before _prune removes the older checkpoints
    _prune(root, snapshot.meta.round)
    return final


def write_signed_meta(folder: Path, record: dict[str, Any], names: tuple[str, ...], key: NodeKey) -> None:
    """meta.json, written last into a folder not yet renamed into place: `record` with the SHA-256 of each of
    `names`, signed by the node; then every file is synced."""
    signed = key.sign({**record, "files": {name: file_sha256(folder / name) for name in names}})
    with open(folder / "meta.json", "w", encoding="utf-8") as f:
        json.dump(signed, f, allow_nan=False)
    sync_folder(folder, files=True)


def _python_rng_state() -> list[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _numpy_rng_state() -> list[Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached)]


def _restore_rngs(record: dict[str, Any], state: dict[str, Any], where: Path) -> None:
    """Every RNG the checkpoint holds; one missing (an older checkpoint) or malformed is left as it is."""
    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.info("%s holds the RNG of %d CUDA device(s), this process sees %d; restoring the first %d",
                     where, len(cuda), torch.cuda.device_count(), min(len(cuda), torch.cuda.device_count()))
        for device, rng in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)     # deferred by torch until CUDA is initialised
    python, numpy_ = record.get("python_rng"), record.get("numpy_rng")
    try:
        if isinstance(python, list) and len(python) == 3 and isinstance(python[1], list):
            random.setstate((python[0], tuple(python[1]), python[2]))
        elif python is not None:
            log.warning("%s: python_rng is malformed; Python's RNG not restored", where)
        if isinstance(numpy_, list) and len(numpy_) == 5 and isinstance(numpy_[1], list):
            np.random.set_state((numpy_[0], np.array(numpy_[1], dtype=np.uint32), *numpy_[2:]))
        elif numpy_ is not None:
            log.warning("%s: numpy_rng is malformed; numpy's RNG not restored", where)
    except (TypeError, ValueError, OverflowError) as exc:
        log.warning("%s: an RNG state is malformed (%s); it was not restored", where, exc)


def _metrics_tail(record: dict[str, Any], where: Path) -> tuple[RoundMetrics, ...]:
    tail = record.get("metrics_tail", [])      # absent in schema 1
    if not isinstance(tail, list):
        log.warning("%s: metrics_tail is not a list; the resumed worker starts without its recent metrics", where)
        return ()
    rows = []
    for row in tail[-METRICS_TAIL:]:
        try:
            rows.append(RoundMetrics.from_json(row if isinstance(row, dict) else {}, f"{where} metrics_tail"))
        except RejectedFile as exc:
            log.warning("%s; that row is dropped", exc)
    return tuple(rows)


def _prune(root: Path, newest: int) -> None:
    """Keep the KEEP_LAST checkpoints up to round `newest`, the one just written; a later round's folder is a
    peer's (or unusable), and never pushes the node's own checkpoints out."""
    own = [path for path in list_folder(root, "round_*")
           if path.name[6:].isascii() and path.name[6:].isdigit() and int(path.name[6:]) <= newest]
    for old in sorted(own)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)


def own_folder(root: Path) -> None:
    """The node's checkpoint folder, made if missing. checkpoints/<node> is in the shared folder: a link a peer
    planted there is replaced by a folder (the link goes, never what it points to), so the node's saves, prunes
    and clean-ups never reach a folder of this machine."""
    with _folder(root, create=True):
        pass


def clear_leftovers(root: Path) -> None:
    """What killed writes left in this node's checkpoint folder: temp folders go, and a checkpoint or best model
    that a write had moved aside (`.<name>.*.old`) when it was killed comes back."""
    own_folder(root)
    remove_stale_temps(root, depth=1)


class CheckpointMismatch(SwarmError):
    """The experiment's checkpoints were made with another model than the one asked for."""


def load_latest_checkpoint(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           model_name: str, key: NodeKey) -> CheckpointMeta | None:
    """Restore the newest checkpoint the node signed (`key`) whose files match its meta.json; one that is
    incomplete, corrupt, unsigned or signed by another key is skipped with a warning.

    An unsigned checkpoint (written before rl-swarm signed them) is used only when no signed one loads and the
    node's key was made by an rl-swarm before signed checkpoints: a node whose key this version made signs every
    checkpoint it writes, so an unsigned one in its folder is a peer's. A folder error that outlasts the retries
    (EIO, a Drive mount gone stale) is raised, never taken for a corrupt checkpoint: a worker that went on from
    the base instead would prune its trained checkpoints with its next saves. It exits, and its restart tries
    again.
    """
    if not root.exists():
        return None
    folders = list_folder(root, "round_*")[::-1]         # bounded, and [] when a peer planted a link there
    # a key with no marker (made before the marker existed) whose checkpoints here are all its signed ones has
    # proven it signs its files: from now on no unsigned checkpoint or base is its own
    if key.predates_signed_files and folders and all(_signed_by(folder, key) for folder in folders):
        key.mark_signs_files()
        log.info("every checkpoint of %s is signed by its key: its key is marked as one that signs", key.node)
    for signed in (True, False) if key.predates_signed_files else (True,):
        for folder in folders:
            try:
                return with_retries(lambda folder=folder, signed=signed: _load_checkpoint(folder, model, optimizer,
                                                                                          model_name, key, signed),
                                    f"loading the checkpoint {folder}", retry_missing=False)
            except _NotThisPass:
                if not key.predates_signed_files:
                    log.warning("checkpoint %s is unsigned and this node's key signs every checkpoint: not its own; "
                                "skipped", folder)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, RejectedFile, SafetensorError,
                    RuntimeError, KeyError, ValueError, TypeError, EOFError,
                    pickle.UnpicklingError) as exc:   # UnpicklingError: state.pt holds more than weights
                log.warning("checkpoint %s is unusable (%s); trying an older one", folder,
                            str(exc).splitlines()[0][:200])
    return None


def _signed_by(folder: Path, key: NodeKey) -> bool:
    try:
        key.verify(read_json_bounded(folder / "meta.json", max_bytes=1024 * 1024), str(folder / "meta.json"))
    except (RejectedFile, OSError):
        return False
    return True


class _NotThisPass(Exception):
    """A checkpoint the other pass of load_latest_checkpoint looks at (signed, or unsigned)."""


def _load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     model_name: str, key: NodeKey, signed: bool) -> CheckpointMeta:
    record = read_json_bounded(folder / "meta.json", max_bytes=1024 * 1024)
    if (SIGNATURE_KEY in record) != signed:
        raise _NotThisPass()
    files: dict[str, Any] = {}
    if signed:
        record = key.verify(record, str(folder / "meta.json"))
        files = record.get("files")
        if record.get("node") != key.node or not isinstance(files, dict) or \
                not all(isinstance(files.get(name), str) for name in FILES):
            raise RejectedFile(f"{folder}: its meta.json names no SHA-256 of its files, or is another node's")
    else:
        log.warning("checkpoint %s is unsigned (written by an rl-swarm before signed checkpoints): used as no "
                    "signed one loads", folder)
    if not isinstance(record.get("round"), int) or not isinstance(record.get("model_name"), str):
        raise RejectedFile(f"{folder / 'meta.json'}: missing round or model_name")
    if record["model_name"] != model_name:
        raise CheckpointMismatch(
            f"{folder} was trained from MODEL_NAME={record['model_name']!r}, not {model_name!r}: "
            f"set MODEL_NAME={record['model_name']} to resume, or use a new EXPERIMENT_NAME")
    # loaded from the bytes whose SHA-256 was checked (a link or FIFO a peer planted: refused, not read); one
    # file at a time, each file's bytes let go once loaded: a restart's host memory peaks at the larger file
    # twice (bytes and tensors), not at both files twice, with every worker of a resumed swarm loading at once
    size = model_bytes(model)
    state_bytes = read_checked(folder / "state.pt", files.get("state.pt"), STATE_SIZES * size + SLACK_BYTES)
    state = torch.load(io.BytesIO(state_bytes), weights_only=True, map_location="cpu")
    del state_bytes
    load_weights(model, read_checked(folder / "model.safetensors", files.get("model.safetensors"),
                                     size + SLACK_BYTES))
    configured = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    # torch takes the saved groups' lr too: a resume with another LEARNING_RATE (said, and kept in config.json)
    # would train on at the old one, and its metrics lines would say so
    for group, lr in zip(optimizer.param_groups, configured):
        group["lr"] = lr
    _restore_rngs(record, state, folder)
    return CheckpointMeta(round=record["round"], node=str(record.get("node", "")),
                          model_name=record["model_name"], metrics_tail=_metrics_tail(record, folder))


def rewrite_lost_records(folder: ExperimentFolder, node: str, meta: CheckpointMeta,
                         key: NodeKey) -> tuple[list[int], set[int]]:
    """Rounds of the checkpoint's tail whose metrics line or rewards file the killed process never wrote, and the
    rounds after the checkpoint's that have a line already (the checkpoint lands behind its round: a kill before
    it did replays them, and they are not recorded twice).

    A worker saves the checkpoint before those two files, so a kill in between loses them; without the
    rewards file the coordinator would wait for a round this node will not play again.
    """
    try:
        keyring = KeyRing(folder)
        keyring.trust(key)
        recorded = {row.round for row in read_jsonl(folder.metrics_file(node),
                                                    signed_lines(RoundMetrics.from_json, node, keyring))}
    except (RejectedFile, OSError) as exc:
        log.warning("could not read this node's metrics to complete them (%s); nothing rewritten", exc)
        return [], set()
    rewritten = []
    for metrics in meta.metrics_tail:
        if metrics.node != node or metrics.round > meta.round:
            continue
        metrics_file, reward_file = folder.metrics_file(node), folder.reward_file(metrics.round, node)
        row = key.sign(metrics.to_json())
        if metrics.round not in recorded:
            with_retries(lambda path=metrics_file, row=row: append_jsonl(path, row), f"appending to {metrics_file}")
            rewritten.append(metrics.round)
        if metrics.round == meta.round and not is_visible(reward_file):
            with_retries(lambda path=reward_file, row=row: write_json_atomic(path, row), f"writing {reward_file}")
            rewritten.append(metrics.round)
    return sorted(set(rewritten)), {round_ for round_ in recorded if round_ > meta.round}


@dataclass
class Progress:
    """Where a worker is in its record-keeping: the last round played, saved and written, and its recent metrics."""

    last_done: int = 0
    last_saved: int = 0                 # the last checkpoint taken: written, or being written
    last_written: int = 0               # the last checkpoint on disk
    history: deque = field(default_factory=lambda: deque(maxlen=METRICS_TAIL))
    checkpoint_owed: bool = False       # a due checkpoint the folder refused: the next round tries again
    lined: set[int] = field(default_factory=set)    # rounds after the checkpoint with a metrics line already

    @classmethod
    def resumed(cls, meta: CheckpointMeta | None) -> "Progress":
        if meta is None:
            return cls()
        return cls(meta.round, meta.round, meta.round, deque(meta.metrics_tail, maxlen=METRICS_TAIL))
