"""A model's weights as files in the shared folder: copied to the host and written one tensor per storage, and
loaded back from the very bytes whose SHA-256 a signed meta.json names.

Checked and loaded from one read: a check of the file by name and a load by name again would load whatever a
peer renamed into place between the two.
"""

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load

from workers.host_copies import fresh_copy
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.safe_io import read_whole

# a weights or state file is refused unread beyond this many bytes over what the model's own tensors take
# (safetensors' header, state.pt's RNGs and pickle framing are far below it)
SLACK_BYTES = 64 * 1024 * 1024


def _shared_names(model: torch.nn.Module) -> list[list[str]]:
    """The model's tensor names, grouped by the tensor they share (GPT-2's lm_head is its wte), each sorted."""
    names: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict().items():
        same = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        names.setdefault(same, []).append(name)
    return [sorted(group) for group in names.values()]


def weight_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights by name, each tensor once, as a safetensors file stores them (not copied): of the names
    sharing one, the alphabetically first is kept, as safetensors' save_model keeps it, and load_weights restores
    the others."""
    tensors = model.state_dict()
    return {group[0]: tensors[group[0]] for group in _shared_names(model)}


def host_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights (weight_tensors) copied to new host memory."""
    return fresh_copy(weight_tensors(model))


def model_bytes(model: torch.nn.Module) -> int:
    """What the model's tensors take, each storage once."""
    tensors = model.state_dict()
    return sum(tensors[group[0]].numel() * tensors[group[0]].element_size() for group in _shared_names(model))


def read_checked(path: Path, sha256: str | None, limit: int) -> bytes:
    """The bytes of `path` when their SHA-256 is `sha256` (None: a file from before signed ones, unchecked);
    RejectedFile naming it otherwise, or when it is over `limit` bytes."""
    data = read_whole(path, limit)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise RejectedFile(f"{path}: not the file its signed meta.json names (SHA-256 differs)")
    return data


def load_weights(model: torch.nn.Module, data: bytes) -> None:
    """The model's weights from the bytes of a safetensors file host_weights (or save_model) wrote; a name that
    shares a tensor with the one written is restored from it. RuntimeError (or safetensors' error) when the file
    is not this model's."""
    tensors = load(data)
    state = {}
    for group in _shared_names(model):
        written = [name for name in group if name in tensors]
        if not written:
            raise RuntimeError(f"no tensor {group[0]!r} in the file")
        state.update({name: tensors[written[0]] for name in group})
    unexpected = sorted(set(tensors) - set(state))
    if unexpected:
        raise RuntimeError(f"tensors this model does not have: {', '.join(unexpected[:3])}")
    model.load_state_dict(state)
