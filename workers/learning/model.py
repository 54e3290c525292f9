"""Loading the policy: offline models built here, a local folder, or any Hugging Face model id."""

import contextlib
import io
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from configs_env import ConfigError, SwarmError
from workers.learning.hub import hub_unreachable, offline_kwargs
from workers.learning.offline_models import GPT2_RANDOM, NO_DROPOUT, TINY, prepare_model

log = logging.getLogger(__name__)

OFFLINE_MODEL_NAMES: tuple[str, ...] = (TINY, GPT2_RANDOM)
DEFAULT_HUB_MODEL = "openai-community/gpt2"
PROMPT_SAMPLE = 32        # questions drawn per task to find its longest prompt
# What transformers and huggingface_hub raise for a missing, gated, unreachable or malformed model
# (hub errors are OSError subclasses; bad ids are ValueError; unknown architectures are KeyError).
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, RuntimeError, SafetensorError)


class ModelLoadError(SwarmError):
    """A model the user named cannot be loaded; never silently replaced by another."""

    def __init__(self, model_name: str, cause: BaseException | str):
        text = str(cause).strip()
        reason = text.splitlines()[0][:160] if text else type(cause).__name__
        super().__init__(f"MODEL_NAME={model_name!r} could not be loaded ({reason}): check the name, or use an "
                         f"offline model: MODEL_NAME={TINY} (CPU, tests) or {GPT2_RANDOM} (GPU benchmarks)")


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    # the fast sampler (workers.learning.decode), built on first use and kept: its KV cache and CUDA graphs
    decoder: object | None = field(default=None, repr=False)
    # the update's CUDA graphs (workers.learning.update_graph), likewise built on first use and kept
    update_graphs: object | None = field(default=None, repr=False)


# Learning rates by model: RL's are measured (README "Learning", bench/LEARNING.md); the warm-up's is supervised.
TINY_LEARNING_RATE, GPT2_LEARNING_RATE = 3e-5, 1e-6


def default_learning_rate(model_name: str) -> float:
    # A round gives each worker only I+J groups (16 completions by default), so most of a step is noise, and
    # Adam moves every weight by ~lr whatever the noise: the tiny model's held-out accuracy fell at 1e-4 and
    # collapsed at 3e-4 in 200 rounds, and rose at 2e-5..5e-5 (3e-5 best over seeds 1-3, README "Learning").
    # GPT-2 124M (H200, bench/LEARNING.md): held-out accuracy fell from the warm-up's at 1e-5 within 150 rounds;
    # at 3e-6 it rose for 500 rounds, then swung on one seed of three and ended under the warm-up's at 1000;
    # 1e-6 rose as fast over 500 rounds, more steadily.
    return TINY_LEARNING_RATE if "tiny" in model_name else GPT2_LEARNING_RATE


def default_warmup_lr(model_name: str) -> float:
    return 1e-3 if "tiny" in model_name else 5e-5


def model_source(model_name: str, cache_dir: Path) -> str:
    """What from_pretrained should open: an offline model's cache folder, a local folder, or a hub id."""
    if model_name in OFFLINE_MODEL_NAMES:
        try:
            return str(prepare_model(model_name, cache_dir))
        except OSError as exc:
            raise ModelLoadError(model_name, f"building it in {cache_dir} failed: {exc}") from exc
    if model_name.startswith("rl-swarm/"):
        raise ModelLoadError(model_name, "not one of the built-in offline models")
    path = Path(model_name).expanduser()
    if path.is_dir():
        return str(path)
    if model_name.startswith(("/", ".", "~")):     # hub ids never start so: the user meant a folder
        raise ModelLoadError(model_name, f"no folder {path}")
    return model_name


def ensure_model_available(model_name: str, cache_dir: Path) -> None:
    """Build an offline model, or check a named one's config resolves, before any worker starts."""
    source = model_source(model_name, cache_dir)
    try:
        AutoConfig.from_pretrained(source, **offline_kwargs(source))
    except _LOAD_ERRORS as exc:
        away = offline_kwargs(source) and hub_unreachable()
        raise ModelLoadError(model_name, f"not in the local cache, and the Hugging Face hub is away ({away})"
                             if away else exc) from exc


def context_length(config: object) -> int:
    """The positions the model attends over: prompt and completion together."""
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))


def check_prompt_room(model_name: str, cache_dir: Path, tasks: tuple[tuple[str, float], ...],
                      max_new_tokens: int) -> None:
    """Refuse a MAX_NEW_TOKENS that leaves the tasks' prompts too few of the model's positions.

    A prompt is cut from the left to fit (generation.encode_prompt): past this limit questions lose their
    start, and at one token left the workers crash-loop. The room kept is the longest of PROMPT_SAMPLE
    prompts per task (a longer question never sampled loses a few tokens, no more).
    """
    from workers.learning.tasks import TaskMix, build_prompt    # reasoning-gym loads only when a swarm starts

    source = model_source(model_name, cache_dir)
    try:
        positions = context_length(AutoConfig.from_pretrained(source, **offline_kwargs(source)))
        tokenizer = AutoTokenizer.from_pretrained(source, **offline_kwargs(source))
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(model_name, exc) from exc
    with contextlib.redirect_stdout(io.StringIO()):      # reasoning-gym's bf prints a dot per question it builds
        questions = [q for name, _ in tasks
                     for q in TaskMix(((name, 1.0),), seed=0).sample(PROMPT_SAMPLE, random.Random(0))]
    longest = max(len(tokenizer(build_prompt(q.question), add_special_tokens=False)["input_ids"]) for q in questions)
    limit = positions - longest
    if limit < 1:
        raise ConfigError(f"TASKS: prompts of up to {longest} tokens leave no room for a completion in "
                          f"{model_name}'s {positions} positions; choose a model with a longer context")
    if max_new_tokens > limit:
        raise ConfigError(f"MAX_NEW_TOKENS={max_new_tokens} leaves {max(0, positions - max_new_tokens)} of "
                          f"{model_name}'s {positions} positions for the prompt; set MAX_NEW_TOKENS <= {limit}")


def resolve_default_model(cache_dir: Path) -> tuple[str, str | None]:
    """MODEL_NAME unset: GPT-2 when the hub or its local cache has it, else the tiny offline model (saying so)."""
    try:
        # The local cache first: no network round trip when GPT-2 was downloaded before.
        AutoConfig.from_pretrained(DEFAULT_HUB_MODEL, local_files_only=True)
        return DEFAULT_HUB_MODEL, None
    except _LOAD_ERRORS as exc:
        log.info("default model not in the local Hugging Face cache: %s", exc)
    away = hub_unreachable()
    if away is None:
        try:
            AutoConfig.from_pretrained(DEFAULT_HUB_MODEL)
            return DEFAULT_HUB_MODEL, None
        except _LOAD_ERRORS as exc:
            log.info("default model unavailable: %s", exc)
            away = f"the hub answered but gave no {DEFAULT_HUB_MODEL}"
    return TINY, (f"MODEL_NAME is unset and {DEFAULT_HUB_MODEL} is not reachable (no Hugging Face hub or cache: "
                  f"{away}): using the built-in offline model {TINY}")


def _dropout_off(model: torch.nn.Module) -> None:
    # GRPO's ratio pi/pi_old needs the same forward twice; dropout would make it noise, even in train mode.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in (*NO_DROPOUT, "dropout", "attention_dropout", "hidden_dropout", "activation_dropout"):
        if isinstance(getattr(model.config, key, None), (int, float)):
            setattr(model.config, key, 0.0)


def _fused_gelu(model: torch.nn.Module) -> None:
    # GPT-2's "gelu_new" is written as eight elementwise ops that autograd saves four tensors of; torch's
    # tanh GELU is the same formula in one kernel that saves only its input (about 1.4 GiB less to keep for
    # a 16 x 304-token update of GPT-2 124M without checkpointing, and fewer launches either way)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child).__name__ == "NewGELUActivation":
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
    if getattr(model.config, "activation_function", None) == "gelu_new":
        model.config.activation_function = "gelu_pytorch_tanh"


def load_policy(model_name: str, device: str | torch.device, cache_dir: Path,
                dtype: torch.dtype | None = None) -> Policy:
    """The model (dropout off, on `device`) and its left-padding tokenizer; any failure is a ModelLoadError."""
    hf_logging.disable_progress_bar()     # the dashboard owns the terminal
    source = model_source(model_name, cache_dir)
    try:
        # The model first: a folder without config.json says so, rather than a tokenizer riddle.
        model = AutoModelForCausalLM.from_pretrained(source, **({"dtype": dtype} if dtype else {}),
                                                     **offline_kwargs(source))
        tokenizer = AutoTokenizer.from_pretrained(source, **offline_kwargs(source))
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(model_name, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"       # generation appends on the right; prompts must end flush
    _dropout_off(model)
    _fused_gelu(model)
    device = torch.device(device)
    return Policy(model=model.to(device), tokenizer=tokenizer, name=model_name, device=device)


def update_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """Around a forward that will be back-propagated, and its backward: on CUDA, any attention kernel but cuDNN's.

    cuDNN builds a plan for every new batch shape (0.30 s against 0.07 s for an update at a width not seen
    before, bench/NOTES.md), and an update's batch is as wide as its round's longest prompt + completion, so
    most rounds are new. Generation keeps cuDNN: its shapes are bucketed and replayed, where cuDNN's decode
    attention is ~20x faster than the memory-efficient kernel's. The switch is process-wide, so it also holds
    for the backward's thread and the activation checkpoints it recomputes.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def use_activation_checkpointing(setting: str, device: torch.device) -> bool:
    """GRADIENT_CHECKPOINTING: auto means on CUDA only, where several workers share one GPU's memory."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward: a 256-token update of GPT-2 124M peaks at ~1.9 GiB
    instead of ~3.8 GiB (bench/RESULTS.md), for ~30% more time in a step that is a small part of a round."""
    # the reentrant variant drops gradients of inputs that need none; the RNG's state need not be kept for the
    # recompute (dropout is off: the forward draws nothing), and reading it is a host call per block that a
    # CUDA graph's capture (workers.learning.update_graph) may refuse
    kwargs = {"use_reentrant": False, "preserve_rng_state": False}
    if hasattr(model, "activation_checkpointing_enable"):         # transformers >= 5.2x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        log.warning("%s supports no activation checkpointing; training keeps every activation",
                    type(model).__name__)
