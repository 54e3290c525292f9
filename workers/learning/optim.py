"""The optimizer of a worker: AdamW whose two moments are kept in bfloat16 on the GPU.

Sixteen workers share one GPU, so every byte per parameter counts: fp32 weights, fp32 gradients and two
fp32 AdamW moments are 16 bytes a parameter (~1.9 GiB for GPT-2 124M). Keeping the moments in bf16 saves
4 of them (~0.46 GiB). The weights stay fp32 (an update of lr=1e-5 would vanish in bf16 weights) and the
arithmetic of each step is fp32; only the stored moments are rounded.

Rounding must be stochastic: with round-to-nearest, exp_avg_sq * 0.999 is a change of 0.1%, under half of
bf16's 0.4% spacing, so the second moment could never decay and the step size would shrink for good.
Rounding up or down with probability by distance keeps each stored moment unbiased.

On CUDA with Triton the whole step of a parameter is one kernel that reads and writes each element once
(20 bytes of traffic, no temporaries); elsewhere it is a few dozen torch kernels over buckets of
parameters. Both draw the rounding noise from (step, group, element), so a resumed run rounds as the
uninterrupted one without saving a generator.
"""

import functools
import logging
from typing import Iterable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # the CPU wheel of torch comes without Triton: the torch path serves
    triton = None


# elements per fused update of the torch path: its ~5 fp32 temporaries (~320 MiB) stay under the backward
# pass's own peak, and GPT-2 124M takes 8 updates, not one per parameter (each is ~25 kernel launches)
PIECE = 16 * 1024 * 1024
NOISE_SEED = 0x5A90
BLOCK = 2048                 # elements per Triton program: 8 KiB of fp32 weights, 16 per thread of 4 warps

log = logging.getLogger(__name__)


def _noise_seed(step: int, group: int) -> int:
    """A 31-bit seed of its own for every step and parameter group: their noise streams must not overlap."""
    return (NOISE_SEED * 0x9E3779B1 + step * 0x85EBCA77 + group * 0xC2B2AE3D) % (2**31 - 1)


class AdamWBf16Moments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with exp_avg and exp_avg_sq stored as bfloat16."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, use_triton: bool | None = None):
        if lr <= 0 or eps <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"AdamWBf16Moments: invalid lr={lr}, betas={betas}, eps={eps} or "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.use_triton = use_triton     # None: on CUDA where Triton runs; True: on CUDA always; False: never
        if use_triton and triton is None:
            raise ValueError("AdamWBf16Moments(use_triton=True): Triton is not installed (pip install triton)")

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        state_dict.pop("rounding_noise", None)     # saved by earlier versions; the noise now follows the step
        super().load_state_dict(state_dict)
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
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        elif state["exp_avg"].dtype != torch.bfloat16:
            # Optimizer.load_state_dict casts saved moments to the parameter's dtype; take them back
            state["exp_avg"] = state["exp_avg"].to(torch.bfloat16).contiguous()
            state["exp_avg_sq"] = state["exp_avg_sq"].to(torch.bfloat16).contiguous()
        return state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            # (param, grad, exp_avg, exp_avg_sq, where the param starts in the group) by the param's own step
            # count: one that had no gradient for a while has its own bias correction
            live: dict[int, list] = {}
            first = 0
            for param in group["params"]:
                if param.grad is not None:
                    state = self._new_state(param)
                    state["step"] += 1          # a CPU tensor: reading it back costs no device sync
                    live.setdefault(int(state["step"]), []).append(
                        (param, param.grad, state["exp_avg"], state["exp_avg_sq"], first))
                first += param.numel()
            for step, entries in live.items():
                device = entries[0][0].device
                if self.use_triton is None:
                    fast = triton is not None and device.type == "cuda" and _triton_runs(device)
                else:
                    fast = self.use_triton and device.type == "cuda"
                (_triton_update if fast else _torch_update)(entries, group, step, _noise_seed(step, index))
        return loss


def _constants(group: dict, step: int) -> tuple[float, float, float, float, float]:
    """step size (lr over the first bias correction), second bias correction, 1 - beta1, beta2, decay."""
    beta1, beta2 = group["betas"]
    return (group["lr"] / (1 - beta1 ** step), 1 - beta2 ** step, 1 - beta1, beta2,
            1 - group["lr"] * group["weight_decay"])


def _torch_update(live: list, group: dict, step: int, seed: int) -> None:
    """The step in torch kernels, over buckets of at most PIECE elements (a few per bucket, not per param)."""
    generator = torch.Generator(device=live[0][0].device)
    generator.manual_seed(seed)
    pieces = []
    for param, grad, exp_avg, exp_avg_sq, _ in live:
        flat = (param.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1), grad.reshape(-1))
        pieces += [tuple(t[start:start + PIECE] for t in flat) for start in range(0, param.numel(), PIECE)]
    bucket: list = []
    for piece in pieces:
        if bucket and sum(p[0].numel() for p in bucket) + piece[0].numel() > PIECE:
            _torch_bucket(bucket, group, step, generator)
            bucket = []
        bucket.append(piece)
    _torch_bucket(bucket, group, step, generator)


def _torch_bucket(bucket: list, group: dict, step: int, generator: torch.Generator) -> None:
    step_size, bias2, fresh1, beta2, decay = _constants(group, step)
    params, moments, moments_sq, grads = (list(column) for column in zip(*bucket))
    grad = torch.cat(grads).float()
    exp_avg = torch.cat(moments).float().lerp_(grad, fresh1)
    exp_avg_sq = torch.cat(moments_sq).float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    del grad
    update = (exp_avg_sq / bias2).sqrt_().add_(group["eps"])
    update = torch.div(exp_avg, update, out=update).mul_(-step_size)
    if decay != 1:
        torch._foreach_mul_(params, decay)
    sizes = [p.numel() for p in params]
    torch._foreach_add_(params, list(update.split(sizes)))
    torch._foreach_copy_(moments, list(_round_stochastically(exp_avg, generator).split(sizes)))
    torch._foreach_copy_(moments_sq, list(_round_stochastically(exp_avg_sq, generator).split(sizes)))


def _round_stochastically(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down at random, in proportion to the distance (unbiased in expectation).

    Works in place on `value` and returns it as bf16: bf16 is the top 16 bits of fp32, so adding noise
    below them and cutting (-65536 is the mask 0xFFFF0000) makes the conversion exact.
    """
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    return value.view(torch.int32).add_(noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


def _triton_update(live: list, group: dict, step: int, seed: int) -> None:
    """One kernel per parameter: each element's weight, gradient and moments read once and written once."""
    step_size, bias2, fresh1, beta2, decay = _constants(group, step)
    with torch.cuda.device(live[0][0].device):          # Triton launches on the current device
        for param, grad, exp_avg, exp_avg_sq, first in live:
            if not param.is_contiguous():
                raise ValueError(f"AdamWBf16Moments: a parameter of shape {tuple(param.shape)} is not "
                                 "contiguous; the step reads it as a flat array (call .contiguous() on the model)")
            numel = param.numel()
            _adamw_bf16_kernel[(triton.cdiv(numel, BLOCK),)](
                param, grad.contiguous(), exp_avg, exp_avg_sq, numel, first, seed, step_size, bias2, fresh1,
                beta2, 1 - beta2, group["eps"], decay, BLOCK=BLOCK)


@functools.cache
def _triton_runs(device: torch.device) -> bool:
    """Whether the Triton step compiles and runs here: Triton needs a C compiler at its first launch, which a
    slim container may lack; then the torch path serves, said once in the log, rather than every step crash."""
    try:
        param, grad = torch.zeros(8, device=device), torch.ones(8, device=device)
        moments = [torch.zeros(8, device=device, dtype=torch.bfloat16) for _ in range(2)]
        _adamw_bf16_kernel[(1,)](param, grad, *moments, 8, 0, 7, 0.1, 0.001, 0.1, 0.999, 0.001, 1e-8, 1.0,
                                 BLOCK=BLOCK)
        return bool(torch.isfinite(param).all() and param.ne(0).all())
    except Exception as exc:  # noqa: BLE001 - any failure to build or run the kernel means: use the torch path
        log.warning("the Triton AdamW step does not run on %s (%s: %s); using the torch kernels",
                    device, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return False


if triton is not None:
    @triton.jit
    def _stochastic_bf16(value, noise):
        # the torch path's trick in registers: noise below bf16's 16 bits, then cut them off
        bits = value.to(tl.int32, bitcast=True) + (noise & 0xFFFF).to(tl.int32)
        return (bits & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _adamw_bf16_kernel(param, grad, exp_avg, exp_avg_sq, numel, first, seed, step_size, bias2, fresh1,
                           beta2, fresh2, eps, decay, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        p = tl.load(param + offsets, mask=inside)
        g = tl.load(grad + offsets, mask=inside).to(tl.float32)
        m = tl.load(exp_avg + offsets, mask=inside).to(tl.float32)
        v = tl.load(exp_avg_sq + offsets, mask=inside).to(tl.float32)
        m = m + fresh1 * (g - m)                   # torch's lerp, with the same fp32 weight
        v = beta2 * v + fresh2 * g * g
        denom = tl.sqrt_rn(v / bias2) + eps
        tl.store(param + offsets, p * decay - step_size * (m / denom), mask=inside)
        noise_m, noise_v, _, _ = tl.randint4x(seed, first + offsets)
        tl.store(exp_avg + offsets, _stochastic_bf16(m, noise_m), mask=inside)
        tl.store(exp_avg_sq + offsets, _stochastic_bf16(v, noise_v), mask=inside)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """On CUDA the bf16-moment AdamW (memory); on CPU torch's AdamW (exact, and what the tests compare to)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and params[0].device.type == "cuda":
        return AdamWBf16Moments(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
