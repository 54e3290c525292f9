"""Sampling G completions for each of a round's prompts, in one padded batch."""

import contextlib
from dataclasses import dataclass

import torch

from workers.learning.decode import GPT2Decoder, supports
from workers.learning.model import Policy, context_length


PROMPT_BUCKET = 32


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its token ids (with EOS when it finished) and its text (without EOS)."""

    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]
    text: str
    finished: bool


def encode_prompt(policy: Policy, prompt: str, max_new_tokens: int) -> list[int]:
    """Prompt ids, cut from the left so prompt + completion fit the model's context."""
    ids = policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    limit = max(1, _context_length(policy) - max_new_tokens)
    return ids[-limit:]


def _context_length(policy: Policy) -> int:
    return context_length(policy.model.config)


def fast_decoder(policy: Policy) -> GPT2Decoder | None:
    """The policy's own GPT-2 sampler (built once), or None for a model it does not write out."""
    if policy.decoder is None and supports(policy.model):
        policy.decoder = GPT2Decoder(policy.model)
    return policy.decoder


@torch.no_grad()
def generate_ids(policy: Policy, input_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int,
                 temperature: float, greedy: bool, fast: bool, min_new_tokens: int = 0) -> torch.Tensor:
    """Prompts + sampled tokens, as `model.generate` with no top-k/top-p returns them.

    `fast`: GPT-2 through workers.learning.decode (static cache, CUDA graphs on CUDA); another model through
    `generate`, with bf16 autocast and a static cache on CUDA. Otherwise plain `generate`.
    """
    eos = policy.tokenizer.eos_token_id
    decoder = fast_decoder(policy) if fast else None
    if decoder is not None:
        return decoder.generate(input_ids, attention, max_new_tokens, temperature, greedy, eos, min_new_tokens)
    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    on_cuda = fast and input_ids.device.type == "cuda"
    extra = {"cache_implementation": "static"} if on_cuda else {}
    context = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    with context:
        return policy.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=not greedy,
                                     max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                     pad_token_id=eos, eos_token_id=eos, **sampling, **extra)


def prompts_per_call(prompts: int, splits: int) -> int:
    """Prompts one generate call takes when a round's `prompts` are sampled in `splits` batches (after a
    CUDA out-of-memory restart): what a round, its rehearsal and the held-out evaluation all batch by."""
    return max(1, -(-prompts // max(1, splits)))


def bucketed_width(policy: Policy, width: int, max_new_tokens: int) -> int:
    """`width` rounded up to a multiple of PROMPT_BUCKET, never past what the context leaves the prompt.

    The fast sampler captures one CUDA graph per shape: a few buckets let rounds with new prompt lengths
    reuse the captured graphs instead of capturing more.
    """
    return min(-(-width // PROMPT_BUCKET) * PROMPT_BUCKET, max(width, _context_length(policy) - max_new_tokens))


def sample_completions(policy: Policy, prompts: list[str], num_generations: int, max_new_tokens: int,
                       temperature: float, generator_seed: int, greedy: bool = False,
                       fast: bool = False) -> list[list[Completion]]:
    """G completions per prompt, sampled at `temperature` with no top-k/top-p, in one left-padded batch."""
    if not prompts:
        return []
    tokenizer, model = policy.tokenizer, policy.model
    eos = tokenizer.eos_token_id
    prompt_ids = [encode_prompt(policy, p, max_new_tokens) for p in prompts]
    width = max(len(ids) for ids in prompt_ids)
    if fast and policy.device.type == "cuda":         # a CUDA graph per shape: a few shapes, reused
        width = bucketed_width(policy, width, max_new_tokens)
    rows = [ids for ids in prompt_ids for _ in range(num_generations)]
    input_ids = torch.tensor([[eos] * (width - len(r)) + r for r in rows], device=policy.device)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=policy.device)
    torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    try:
        output = generate_ids(policy, input_ids, attention, max_new_tokens, temperature, greedy, fast)
    finally:
        model.train(was_training)
    new_tokens = output[:, width:].tolist()
    groups: list[list[Completion]] = []
    for p, ids in enumerate(prompt_ids):
        group = []
        for g in range(num_generations):
            tokens = new_tokens[p * num_generations + g]
            # pad == eos in GPT-2: the completion ends at the first EOS, which is kept and trained
            finished = eos in tokens
            kept = tokens[: tokens.index(eos) + 1] if finished else tokens
            text = tokenizer.decode(kept[:-1] if finished else kept, skip_special_tokens=True)
            group.append(Completion(prompt_ids=tuple(ids), ids=tuple(kept), text=text, finished=finished))
        groups.append(group)
    return groups


class CompletionTooLong(ValueError):
    """A peer's completion longer than this worker's MAX_NEW_TOKENS."""


class CompletionMismatch(ValueError):
    """A peer's token ids that spell another text than its completion, or end otherwise than it says."""


def encode_completion(policy: Policy, text: str, finished: bool, max_new_tokens: int,
                      sampled: tuple[int, ...] | None = None) -> list[int]:
    """A peer's completion as our tokens: the ids it sampled when they spell its text (EOS last when it finished),
    else the text tokenised alone (a file without ids) with EOS appended when it finished.

    Raises CompletionTooLong past max_new_tokens, never cuts: the whole text is what earned its reward, and a
    cut prefix trained on that reward would teach whatever the peer put first. Raises CompletionMismatch when
    the ids spell another text than the one scored.
    """
    eos = policy.tokenizer.eos_token_id
    if sampled is not None:
        ids = list(sampled)
        ends_with_eos = bool(ids) and ids[-1] == eos
        body = ids[:-1] if ends_with_eos else ids
        if ends_with_eos != finished or eos in body or (body and max(body) >= len(policy.tokenizer)) \
                or policy.tokenizer.decode(body, skip_special_tokens=True) != text:
            raise CompletionMismatch("its token ids do not spell its completion")
    else:
        ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if finished else [])
    if len(ids) > max_new_tokens:
        raise CompletionTooLong(f"a completion of {len(ids)} tokens, over MAX_NEW_TOKENS={max_new_tokens}")
    return ids or [eos]
