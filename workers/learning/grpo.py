"""GRPO as SAPO uses it: group-relative advantages, a clipped token-level surrogate, optional KL.

Notation follows the GRPO/DAPO papers: for question q with G completions o_i and rewards r_i,
A_i = (r_i - mean(r)) / (std(r) + eps); the per-token objective is the clipped surrogate
min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) with rho_t = pi(o_t) / pi_old(o_t), minus
beta * KL(pi || pi_ref) (k3 estimator); the loss is its negative averaged over every completion token of
the batch ("token" normalisation, DAPO) or per sequence then over sequences ("sequence", GRPO).
"""

import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from workers.learning import softmax_kernels


# rows of the output head per chunk of the fused log-probs: one chunk's logits and their gradient stay near
# 25 MiB (bf16, Triton softmax) or 100 MiB (fp32 copies, torch path) for GPT-2's 50k vocabulary
# (bench/RESULTS.md compares 256 with 1024)
LOGPROB_CHUNK = 256


def group_advantages(rewards: torch.Tensor, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """(num_groups, G) rewards -> advantages; a group whose rewards are all equal gets exactly zero."""
    if scale not in ("std", "none"):
        raise ValueError(f"scale={scale!r}: expected 'std' or 'none'")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "std":
        # population std (divide by G, unbiased=False): the G completions are the whole group the
        # advantage is relative to, not a sample from which to estimate a wider spread
        centred = centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    # the mean of equal floats need not round back to them (8 x 0.1 in float32), and dividing that
    # residue by eps would turn "no signal" into a spurious push
    flat = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centred), centred)


@dataclass
class RolloutBatch:
    """Prompts left-padded to P, completions right-padded to C; masks are by position, never by token id."""

    input_ids: torch.Tensor        # (B, P + C) long
    attention_mask: torch.Tensor   # (B, P + C) long: 1 for prompt and completion tokens
    position_ids: torch.Tensor     # (B, P + C) long: 0 at each row's first real token
    completion_mask: torch.Tensor  # (B, C) float: 1 for completion tokens (EOS included), 0 for padding
    prompt_len: int                # P

    def rows(self, index: slice) -> "RolloutBatch":
        """The same batch restricted to some rows (a micro-batch)."""
        return RolloutBatch(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                            self.completion_mask[index], self.prompt_len)


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                device: torch.device | str = "cpu", prompt_width: int = 0, completion_width: int = 0) -> RolloutBatch:
    """Token-id lists -> one padded batch, at least `prompt_width` + `completion_width` wide; a completion's EOS
    is trained, its padding is not."""
    if not prompts or len(prompts) != len(completions):
        raise ValueError(f"build_batch: {len(prompts)} prompts for {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("build_batch: an empty prompt leaves no position to predict the first completion token")
    width_p = max(prompt_width, *(len(p) for p in prompts))
    width_c = max(completion_width, *(len(c) for c in completions))
    ids, mask, done = [], [], []
    for prompt, completion in zip(prompts, completions):
        left, right = width_p - len(prompt), width_c - len(completion)
        ids.append([pad_id] * left + prompt + completion + [pad_id] * right)
        # by position: GPT-2 pads with its EOS id, so a token-id test would also drop the trained EOS
        mask.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        done.append([1.0] * len(completion) + [0.0] * right)
    attention = torch.tensor(mask, dtype=torch.long, device=device)
    # GPT-2 does not derive positions from the mask: a left-padded row must still start at position 0
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return RolloutBatch(input_ids=torch.tensor(ids, dtype=torch.long, device=device), attention_mask=attention,
                        position_ids=positions, completion_mask=torch.tensor(done, device=device),
                        prompt_len=width_p)


class _HeadLogProbs(torch.autograd.Function):
    """log_softmax(states @ weight.T)[targets], `chunk` rows at a time, never keeping a (rows x vocab) tensor.

    Forward keeps one number per row (the log-sum-exp); backward recomputes each chunk's logits once and
    turns them straight into the logits' gradient, g * (onehot(target) - softmax), in place. Against
    checkpointed head + log_softmax + gather, that is one head matmul fewer per chunk and a handful of
    kernels where autograd launches dozens: the step of a small model is bound by launches.
    """

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        h, w = states.to(dtype), weight.to(dtype)     # one cast of the head for every chunk, not one each
        # a softmax over 50k entries loses too much in half precision: fp32 from the matmul on (fp64 kept)
        acc = torch.promote_types(dtype, torch.float32)
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        lse = torch.empty_like(out)
        targets = targets.contiguous()
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = h[rows] @ w.t()
            if softmax_kernels.available(logits) and acc == torch.float32:
                softmax_kernels.logsumexp_and_target(logits, targets[rows], lse[rows], out[rows])
                continue
            logits = logits.to(acc)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        # the weight is saved as the parameter it is and cast again in backward: a saved bf16 copy would be
        # 77 MiB of GPT-2's head held from the forward to the backward, through the worker's peak
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.states_dtype, ctx.weight_dtype = chunk, states.dtype, weight.dtype
        ctx.device_type = states.device.type
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # backward may run inside the caller's autocast: the logits must be recomputed exactly as forward
        # made them (in h's dtype), or they would not match the saved log-sum-exp
        with torch.autocast(ctx.device_type, enabled=False):
            return _HeadLogProbs._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        g = grad_out.to(lse.dtype).contiguous()      # autograd may hand over an expanded (stride 0) gradient
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits = h[rows] @ w.t()
            if softmax_kernels.available(logits) and lse.dtype == torch.float32:
                softmax_kernels.logits_to_grad_(logits, targets[rows], lse[rows], g[rows])
                grad = logits
            else:
                # d logp / d logits = onehot(target) - softmax; times the incoming gradient, in place
                grad = logits.to(lse.dtype).sub_(lse[rows, None]).exp_().mul_(-g[rows, None])
                grad.scatter_add_(1, targets[rows, None], g[rows, None])
                grad = grad.to(h.dtype)
            if grad_h is not None:
                grad_h[rows] = grad @ w
            if grad_w is not None:
                _accumulate_product(grad_w, grad.t(), h[rows])
        return (grad_h.to(ctx.states_dtype) if grad_h is not None else None,
                grad_w.to(ctx.weight_dtype) if grad_w is not None else None, None, None, None)


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with a half-precision product summed in acc's fp32 by the GEMM itself where it can.

    Rounding each chunk's product to bf16 before adding it loses ~2e-3 of the head's gradient and costs
    a pass over it per chunk; cuBLAS can write bf16 inputs' product to fp32 directly (torch >= 2.8, CUDA).
    """
    if acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and _fp32_out_addmm(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b


@functools.cache
def _fp32_out_addmm(device: torch.device) -> bool:
    """Whether torch.addmm takes out_dtype here (CUDA builds of torch >= 2.8 only)."""
    if device.type != "cuda":
        return False
    try:
        acc = torch.zeros(2, 2, device=device)
        half = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        torch.addmm(acc, half, half, out_dtype=torch.float32, out=acc)
        return bool(acc.eq(2).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def head_logprobs(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(rows,) log-probs of `targets` under a linear `head` on (rows, d) `states`, fp32 (fp64 kept); fused when
    the head has no bias, as GPT-2's has not."""
    weight = head.weight
    if getattr(head, "bias", None) is not None:
        return _biased_head_logprobs(head, states, targets, chunk_size)
    # the matmul's dtype is what autocast would give it: bf16 on a GPU under autocast, else the states'
    device = states.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(states.dtype, weight.dtype)
    with torch.autocast(device, enabled=False):
        return _HeadLogProbs.apply(states, weight, targets, max(1, chunk_size), dtype)


def _biased_head_logprobs(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int) -> torch.Tensor:
    """The unfused way, for output heads with a bias (GPT-2's has none): autograd keeps each chunk's logits."""
    pieces = []
    for start in range(0, states.shape[0], max(1, chunk_size)):
        logits = head(states[start:start + chunk_size])
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        pieces.append(torch.log_softmax(logits, -1).gather(1, targets[start:start + chunk_size, None]).squeeze(1))
    return torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)


def completion_logprobs(model: torch.nn.Module, batch: RolloutBatch, chunk_size: int = 4096) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for completion tokens only, (B, C); 0 where completion_mask is 0.

    Only the hidden states that predict completion tokens go through the output head, `chunk_size`
    rows at a time (`head_logprobs`): the logits' memory stays one chunk's worth however large G and
    the completion length grow.
    """
    # no KV cache: nothing generates from this forward, and it would be kept for nothing (and warned about
    # under activation checkpointing)
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False).last_hidden_state
    p, c = batch.prompt_len, batch.completion_mask.shape[1]
    states = hidden[:, p - 1:p - 1 + c, :]                            # position t predicts token t + 1
    targets = batch.input_ids[:, p:p + c]
    head = model.get_output_embeddings()
    flat = head_logprobs(head, states.reshape(-1, states.shape[-1]), targets.reshape(-1), chunk_size)
    logp = flat.view_as(targets)
    # padding positions get 0 rather than the log-prob of a pad token, so nothing downstream can overflow
    return torch.where(batch.completion_mask.bool(), logp, torch.zeros_like(logp))


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.28,
              normalize: str = "token", total_tokens: torch.Tensor | None = None,
              total_rows: int | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of (B, C) token log-probs under (B,) advantages, and its stats.

    The stats (loss, clip_fraction, ratio and, when beta > 0, kl; means over this batch's completion
    tokens) are detached 0-d tensors, not floats: a float would stop the host for the device at every
    micro-batch, so the caller converts them once. clip_fraction counts the tokens whose gradient the
    clip removes (ratio above 1 + eps_high with A > 0, or below 1 - eps_low with A < 0).
    `total_tokens` / `total_rows` let a micro-batch normalise by the whole batch, so accumulated
    gradients equal those of one large step.
    """
    if normalize not in ("token", "sequence"):
        raise ValueError(f"normalize={normalize!r}: expected 'token' or 'sequence'")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference policy's log-probs)")
    mask = completion_mask.bool()
    zero = torch.zeros_like(logp)
    # padded positions are zeroed before exp, not after: 0 * inf there would poison the gradient
    log_ratio = torch.where(mask, logp - old_logp, zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype)[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if beta > 0:
        delta = torch.where(mask, ref_logp - logp, zero)
        kl = torch.exp(delta) - delta - 1                              # k3 estimator: unbiased, always >= 0
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, zero)
    counts = mask.sum(dim=1).to(logp.dtype)
    if normalize == "token":
        denom = total_tokens if total_tokens is not None else counts.sum()
        loss = per_token.sum() / denom.clamp(min=1)
    else:
        rows = total_rows if total_rows is not None else logp.shape[0]
        # a tensor (a CUDA graph's input) is clamped on the device: max() would stop the host to compare
        rows = rows.clamp(min=1) if isinstance(rows, torch.Tensor) else max(rows, 1)
        loss = (per_token.sum(dim=1) / counts.clamp(min=1)).sum() / rows
    with torch.no_grad():
        tokens = counts.sum().clamp(min=1)
        clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 1 - eps_low) & (adv < 0))
        stats = {"loss": loss.detach(), "clip_fraction": (clipped & mask).sum() / tokens,
                 "ratio": torch.where(mask, ratio, zero).sum() / tokens}
        if kl is not None:
            stats["kl"] = torch.where(mask, kl, zero).sum() / tokens
    return loss, stats


def grpo_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
              advantages: torch.Tensor, *, num_iterations: int = 1, micro_batch_size: int | None = None,
              ref_model: torch.nn.Module | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.28, normalize: str = "token", max_grad_norm: float = 1.0,
              chunk_size: int = 4096) -> dict[str, float]:
    """`num_iterations` optimizer steps on one batch of (B,) advantages; stats averaged over the steps.

    Gradients accumulate over micro-batches of `micro_batch_size` rows, each normalised by the whole
    batch, so the step is the same as one full-batch step. The KL term is used only when beta > 0 and
    a `ref_model` is given. Returns loss, grad_norm (before clipping), clip_fraction, ratio, kl (when
    used) and tokens, as floats read from the device once, and skipped_steps: the steps whose gradient was not
    finite, which left the weights and the optimizer's state as they were.
    """
    parts = _micro_batches(batch, advantages, num_iterations, micro_batch_size)
    total_tokens = batch.completion_mask.sum()
    if batch.completion_mask.shape[1] == 0:                           # nothing to learn from
        return {"loss": 0.0, "grad_norm": 0.0, "clip_fraction": 0.0, "ratio": 1.0, "tokens": 0.0, "skipped_steps": 0.0}
    use_kl = beta > 0 and ref_model is not None
    ref: list[torch.Tensor | None] = [None] * len(parts)
    if use_kl:
        with torch.no_grad():
            ref = [completion_logprobs(ref_model, batch.rows(part), chunk_size) for part in parts]
    loss_of = functools.partial(grpo_loss, beta=beta if use_kl else 0.0, eps_low=eps_low, eps_high=eps_high,
                                normalize=normalize, total_tokens=total_tokens, total_rows=batch.input_ids.shape[0])
    # pi_old is the policy before the first step, so the first iteration's own log-probs (detached) are
    # old_logp: no separate no-grad forward, and with one iteration the ratio is exactly 1
    old: list[torch.Tensor | None] = [None] * len(parts)
    names = ["loss", "grad_norm", "clip_fraction", "ratio"] + (["kl"] if use_kl else [])
    sums = {name: torch.zeros((), device=batch.input_ids.device) for name in names}
    skipped = 0
    for _ in range(num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for k, part in enumerate(parts):
            sub = batch.rows(part)
            logp = completion_logprobs(model, sub, chunk_size)
            if old[k] is None:
                old[k] = logp.detach()
            loss, stats = loss_of(logp, old[k], advantages[part], sub.completion_mask, ref_logp=ref[k])
            loss.backward()
            sums = _add_stats(sums, stats, share=sub.completion_mask.sum() / total_tokens.clamp(min=1))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        sums["grad_norm"] = sums["grad_norm"] + norm
        if not step_if_finite(optimizer, norm):
            skipped += 1
    optimizer.zero_grad(set_to_none=True)
    values = torch.stack([sums[name].float() / num_iterations for name in names] + [total_tokens.float()]).tolist()
    return {**dict(zip(names + ["tokens"], values)), "skipped_steps": float(skipped)}


def _micro_batches(batch: RolloutBatch, advantages: torch.Tensor, num_iterations: int,
                   micro_batch_size: int | None) -> list[slice]:
    """The rows of each micro-batch of grpo_step, after checking its arguments."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations={num_iterations}: expected an integer >= 1")
    rows = batch.input_ids.shape[0]
    if advantages.shape != (rows,):
        raise ValueError(f"advantages of shape {tuple(advantages.shape)}: expected ({rows},), one per completion")
    size = micro_batch_size or rows
    if size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}: expected an integer >= 1 or None")
    return [slice(i, i + size) for i in range(0, rows, size)]


def _add_stats(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor],
               share: torch.Tensor) -> dict[str, torch.Tensor]:
    """The running sums with one micro-batch's stats added (grad_norm is the step's, added after it)."""
    # each part's loss is already a share of the whole batch's; per-token stats weigh by the part's tokens
    added = dict(sums)
    for name in sums:
        if name == "loss":
            added[name] = sums[name] + stats["loss"]
        elif name != "grad_norm":
            added[name] = sums[name] + stats[name] * share
    return added


def step_if_finite(optimizer: torch.optim.Optimizer, norm: torch.Tensor) -> bool:
    """Step on the accumulated gradient unless its norm is not finite; whether it stepped."""
    # a NaN or inf anywhere in the gradient would reach every weight through the step (clipping scales
    # by max_norm / inf): such a step is skipped, as AMP's loss scaler does. One device sync per step.
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True
