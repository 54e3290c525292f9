"""The optimizer of a worker: AdamW whose two moments are kept in bfloat16 on the GPU.

Sixteen workers share one GPU, so every byte per parameter counts: fp32 weights, fp32 gradients and two
fp32 AdamW moments are 16 bytes a parameter (~1.9 GiB for GPT-2 124M). Keeping the moments in bf16 saves
4 of them (~0.46 GiB). The weights stay fp32 (an update of lr=1e-5 would vanish in bf16 weights) and the
arithmetic of each step is fp32; only the stored moments are rounded.

Rounding must be stochastic: with round-to-nearest, exp_avg_sq * 0.999 is a change of 0.1%, under half of
bf16's 0.4% spacing, so the second moment could never decay and the step size would shrink for good.
Rounding up or down with probability by distance keeps each stored moment unbiased.
"""

from typing import Iterable

import torch


# elements per fused update: its ~5 fp32 temporaries (~320 MiB) stay under the backward pass's own peak,
# and GPT-2 124M takes 8 updates, not one per parameter (each is ~25 kernel launches, and launches are
# what a step of a small model costs)
PIECE = 16 * 1024 * 1024


class AdamWBf16Moments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with exp_avg and exp_avg_sq stored as bfloat16."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"AdamWBf16Moments: invalid lr={lr}, betas={betas}, eps={eps} or "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._noise: torch.Generator | None = None
        self._saved_noise: torch.Tensor | None = None       # from a checkpoint, until the generator exists

    def _generator(self, device: torch.device) -> torch.Generator:
        # its own stream, so the rounding noise never shifts the sampling seeds of generation
        if self._noise is None or self._noise.device != device:
            self._noise = torch.Generator(device=device)
            self._noise.manual_seed(0x5A90)
            if self._saved_noise is not None:
                self._noise.set_state(self._saved_noise)
                self._saved_noise = None
        return self._noise

    def state_dict(self) -> dict:
        """torch's state, plus where the rounding noise stands: a resumed run rounds as the uninterrupted one."""
        state = super().state_dict()
        noise = self._noise.get_state() if self._noise is not None else self._saved_noise
        if noise is not None:
            state["rounding_noise"] = noise
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        noise = state_dict.pop("rounding_noise", None)
        super().load_state_dict(state_dict)
        self._noise, self._saved_noise = None, noise
        # torch casts loaded moments to the parameter's dtype; bf16 -> fp32 -> bf16 is exact, so take them
        # back now rather than hold fp32 moments (0.46 GiB more for GPT-2) until the first step
        self.allocate_state()

    def allocate_state(self) -> None:
        """Create every parameter's (zero) moments now rather than at the first step; changes no update."""
        for group in self.param_groups:
            for param in group["params"]:
                self._new_state(param)

    def _new_state(self, param: torch.nn.Parameter) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
        elif state["exp_avg"].dtype != torch.bfloat16:
            # Optimizer.load_state_dict casts saved moments to the parameter's dtype; take them back
            state["exp_avg"] = state["exp_avg"].to(torch.bfloat16)
            state["exp_avg_sq"] = state["exp_avg_sq"].to(torch.bfloat16)
        return state

    def _moments(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._new_state(param)
        state["step"] += 1          # a CPU tensor: reading it back costs no device sync
        return state["exp_avg"], state["exp_avg_sq"], float(state["step"])

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            pieces = []     # (param, moment, moment_sq, grad) views of at most PIECE elements each
            step = 0.0
            for param in group["params"]:
                if param.grad is None:
                    continue
                exp_avg, exp_avg_sq, step = self._moments(param)
                flat = (param.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1), param.grad.view(-1))
                for start in range(0, param.numel(), PIECE):
                    pieces.append(tuple(t[start:start + PIECE] for t in flat))
            if not pieces:
                continue
            bucket: list = []
            for piece in pieces:
                if bucket and sum(p[0].numel() for p in bucket) + piece[0].numel() > PIECE:
                    self._update(bucket, group, step)
                    bucket = []
                bucket.append(piece)
            self._update(bucket, group, step)
        return loss

    def _update(self, bucket: list, group: dict, step: float) -> None:
        """One fused update of a few parameters' slices: ~20 kernels for the bucket, not per parameter."""
        beta1, beta2 = group["betas"]
        params, moments, moments_sq, grads = (list(column) for column in zip(*bucket))
        grad = torch.cat(grads).float()
        exp_avg = torch.cat(moments).float().lerp_(grad, 1 - beta1)
        exp_avg_sq = torch.cat(moments_sq).float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        del grad
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        update = (exp_avg_sq / bias2).sqrt_().add_(group["eps"])
        update = torch.div(exp_avg, update, out=update).mul_(-group["lr"] / bias1)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        sizes = [p.numel() for p in params]
        torch._foreach_add_(params, list(update.split(sizes)))
        noise = self._generator(update.device)
        torch._foreach_copy_(moments, list(_round_stochastically(exp_avg, noise).split(sizes)))
        torch._foreach_copy_(moments_sq, list(_round_stochastically(exp_avg_sq, noise).split(sizes)))


def _round_stochastically(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down at random, in proportion to the distance (unbiased in expectation).

    Works in place on `value` and returns it as bf16: bf16 is the top 16 bits of fp32, so adding noise
    below them and cutting (-65536 is the mask 0xFFFF0000) makes the conversion exact.
    """
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    return value.view(torch.int32).add_(noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """On CUDA the bf16-moment AdamW (memory); on CPU torch's AdamW (exact, and what the tests compare to)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and params[0].device.type == "cuda":
        return AdamWBf16Moments(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
