"""Loading the policy: offline models built here, a local folder, or any Hugging Face model id."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from configs_env import SwarmError
from workers.offline_models import GPT2_RANDOM, TINY, prepare_model

log = logging.getLogger(__name__)

OFFLINE_MODEL_NAMES: tuple[str, ...] = (TINY, GPT2_RANDOM)
DEFAULT_HUB_MODEL = "openai-community/gpt2"


class ModelLoadError(SwarmError):
    """A model the user named cannot be loaded; never silently replaced by another."""

    def __init__(self, name: str, cause: BaseException | str):
        reason = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else type(cause).__name__
        super().__init__(f"MODEL_NAME={name!r} could not be loaded ({reason}): check the name, or use an offline "
                         f"model: MODEL_NAME={TINY} (CPU, tests) or {GPT2_RANDOM} (GPU benchmarks)")


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device


def _source(name: str, cache_dir: Path) -> str:
    if name in OFFLINE_MODEL_NAMES:
        return str(prepare_model(name, cache_dir))
    return name


def ensure_model_available(name: str, cache_dir: Path) -> None:
    """Build an offline model, or check a named one's config resolves, before any worker starts."""
    try:
        AutoConfig.from_pretrained(_source(name, cache_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(name, exc) from exc


def resolve_default_model(cache_dir: Path) -> tuple[str, str | None]:
    """MODEL_NAME unset: GPT-2 when the hub or its local cache has it, else the tiny offline model (saying so)."""
    try:
        AutoConfig.from_pretrained(DEFAULT_HUB_MODEL)
        return DEFAULT_HUB_MODEL, None
    except (OSError, ValueError) as exc:
        log.info("default model unavailable: %s", exc)
        return TINY, (f"MODEL_NAME is unset and {DEFAULT_HUB_MODEL} is not reachable (no Hugging Face hub or "
                      f"cache): using the built-in offline model {TINY}")


def _dropout_off(model: torch.nn.Module) -> None:
    # GRPO's ratio pi/pi_old needs the same forward twice; dropout would make it noise.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "dropout",
                "attention_dropout", "hidden_dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)


def load_policy(name: str, device: str | torch.device, cache_dir: Path, dtype: torch.dtype | None = None) -> Policy:
    hf_logging.disable_progress_bar()     # the dashboard owns the terminal
    source = _source(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype) if dtype else \
            AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(name, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    _dropout_off(model)
    device = torch.device(device)
    return Policy(model=model.to(device), tokenizer=tokenizer, name=name, device=device)
