"""GRPO as SAPO uses it: group-relative advantages, a clipped token-level surrogate, optional KL.

Notation follows the GRPO/DAPO papers: for question q with G completions o_i and rewards r_i,
A_i = (r_i - mean(r)) / (std(r) + eps); the loss is the negative clipped surrogate
min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i), averaged over every completion token of
the batch ("token" normalisation, DAPO) or per sequence then over sequences ("sequence", GRPO).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """(num_groups, G) rewards -> advantages; a group whose rewards are all equal gets exactly zero."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    # population std (divide by G): the group is the whole sample of this question, not an estimate of one
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


@dataclass
class RolloutBatch:
    """Prompts left-padded to P, completions right-padded to C; masks are by position, never by token id."""

    input_ids: torch.Tensor        # (B, P + C)
    attention_mask: torch.Tensor   # (B, P + C)
    position_ids: torch.Tensor     # (B, P + C)
    completion_mask: torch.Tensor  # (B, C) float: 1 for completion tokens (EOS included), 0 for padding
    prompt_len: int

    def rows(self, index: slice) -> "RolloutBatch":
        return RolloutBatch(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                            self.completion_mask[index], self.prompt_len)


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                device: torch.device | str = "cpu") -> RolloutBatch:
    width_p = max(len(p) for p in prompts)
    width_c = max(len(c) for c in completions)
    ids, mask, done = [], [], []
    for prompt, completion in zip(prompts, completions):
        left, right = width_p - len(prompt), width_c - len(completion)
        ids.append([pad_id] * left + prompt + completion + [pad_id] * right)
        mask.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        done.append([1.0] * len(completion) + [0.0] * right)
    attention = torch.tensor(mask, device=device)
    # GPT-2 does not derive positions from the mask: a left-padded row must still start at position 0
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return RolloutBatch(input_ids=torch.tensor(ids, device=device), attention_mask=attention,
                        position_ids=positions, completion_mask=torch.tensor(done, device=device),
                        prompt_len=width_p)


def completion_logprobs(model: torch.nn.Module, batch: RolloutBatch, chunk_size: int = 4096) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for completion tokens only, (B, C).

    Only the hidden states that predict completion tokens go through the output head, in chunks of
    rows, so the (rows x vocab) logits never exist for prompt positions or all at once.
    """
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids).last_hidden_state
    p = batch.prompt_len
    states = hidden[:, p - 1:-1, :]                                    # position t predicts token t + 1
    targets = batch.input_ids[:, p:]
    head = model.get_output_embeddings()
    flat_states, flat_targets = states.reshape(-1, states.shape[-1]), targets.reshape(-1)
    pieces = []
    for start in range(0, flat_states.shape[0], chunk_size):
        logits = head(flat_states[start:start + chunk_size])
        if logits.dtype in (torch.float16, torch.bfloat16):    # log_softmax over 50k entries needs fp32
            logits = logits.float()
        pieces.append(torch.gather(F.log_softmax(logits, dim=-1), 1,
                                   flat_targets[start:start + chunk_size, None]).squeeze(1))
    return torch.cat(pieces).view_as(targets)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.28,
              normalize: str = "token", total_tokens: torch.Tensor | None = None,
              total_rows: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and detached stats (tensors, so the caller syncs with the device once, not per number).

    `total_tokens`/`total_rows` let micro-batches normalise by the whole batch, so accumulated
    gradients equal those of one large step.
    """
    mask = completion_mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if beta > 0 and ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1                              # k3 estimator, always >= 0
        per_token = per_token + beta * kl
    if normalize == "token":
        denom = total_tokens if total_tokens is not None else mask.sum()
        loss = (per_token * mask).sum() / denom.clamp(min=1)
    elif normalize == "sequence":
        rows = total_rows if total_rows is not None else logp.shape[0]
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / rows
    else:
        raise ValueError(f"normalize={normalize!r}: expected 'token' or 'sequence'")
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).to(mask.dtype)
        stats = {"clip_fraction": (clipped * mask).sum() / tokens, "ratio": (ratio * mask).sum() / tokens}
        if kl is not None:
            stats["kl"] = (kl * mask).sum() / tokens
    return loss, stats


def grpo_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
              advantages: torch.Tensor, *, num_iterations: int = 1, micro_batch_size: int | None = None,
              ref_model: torch.nn.Module | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.28, normalize: str = "token", max_grad_norm: float = 1.0,
              chunk_size: int = 4096) -> dict[str, float]:
    """`num_iterations` optimizer steps on one batch; with one step the ratio is 1 and clipping a no-op."""
    rows = batch.input_ids.shape[0]
    size = micro_batch_size or rows
    slices = [slice(i, i + size) for i in range(0, rows, size)]
    total_tokens = batch.completion_mask.sum()
    old, ref = [], []
    if num_iterations > 1 or (beta > 0 and ref_model is not None):
        with torch.no_grad():
            for part in slices:
                if num_iterations > 1:
                    old.append(completion_logprobs(model, batch.rows(part), chunk_size))
                if beta > 0 and ref_model is not None:
                    ref.append(completion_logprobs(ref_model, batch.rows(part), chunk_size))
    loss_sum = torch.zeros((), device=batch.input_ids.device)
    clip_sum = torch.zeros((), device=batch.input_ids.device)
    grad_norm = torch.zeros((), device=batch.input_ids.device)
    for _ in range(num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for k, part in enumerate(slices):
            sub = batch.rows(part)
            logp = completion_logprobs(model, sub, chunk_size)
            loss, stats = grpo_loss(logp, old[k] if old else logp.detach(), advantages[part], sub.completion_mask,
                                    ref_logp=ref[k] if ref else None, beta=beta, eps_low=eps_low,
                                    eps_high=eps_high, normalize=normalize, total_tokens=total_tokens,
                                    total_rows=rows)
            loss.backward()
            loss_sum = loss_sum + loss.detach()
            clip_sum = clip_sum + stats["clip_fraction"] * sub.completion_mask.sum() / total_tokens.clamp(min=1)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    values = torch.stack([loss_sum / num_iterations, grad_norm.float(), clip_sum / num_iterations]).tolist()
    return {"loss": values[0], "grad_norm": values[1], "clip_fraction": values[2], "tokens": float(total_tokens)}
