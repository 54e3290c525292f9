"""The fused head's softmax on CUDA as two Triton kernels: one row's log-sum-exp and target log-prob, and
one row's logits turned into their gradient in place.

In torch each chunk of the head is ~25 kernels (casts, a composite logsumexp, gathers, scatters, copies),
and a train step of GPT-2 is bound by their launches: 16 chunks cost ~10 ms of host time against ~1 ms
for the naive path's one big head. Here a chunk is its GEMMs and one kernel, reading the bf16 logits as
they came out of the GEMM and doing all arithmetic in fp32, as the torch path does.
"""

import functools
import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # the CPU wheel of torch comes without Triton: workers.learning.grpo keeps the torch path
    triton = None

BLOCK_V = 4096               # vocabulary entries a program holds at once (GPT-2's 50257 in 13 steps)

log = logging.getLogger(__name__)


def available(logits: torch.Tensor) -> bool:
    """Whether these (rows, vocab) logits can take the kernels: half precision, contiguous, on CUDA."""
    return (triton is not None and logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16)
            and logits.is_contiguous() and _kernels_run(logits.device))


@functools.cache
def _kernels_run(device: torch.device) -> bool:
    """Whether both kernels compile and run here (Triton needs a C compiler at its first launch); if not,
    the torch path serves, said once in the log."""
    try:
        logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]], device=device, dtype=torch.bfloat16)
        targets = torch.zeros(1, device=device, dtype=torch.long)
        lse, out = torch.empty(1, device=device), torch.empty(1, device=device)
        _lse_kernel[(1,)](logits, targets, lse, out, 4, BLOCK_V=BLOCK_V, num_warps=8)
        _grad_kernel[(1,)](logits, targets, lse, torch.ones(1, device=device), 4, BLOCK_V=BLOCK_V, num_warps=8)
        # log(4) and log(1/4), then the gradient 1 - 1/4 at the target and -1/4 elsewhere
        return (abs(lse.item() - 1.3862944) < 1e-3 and abs(out.item() + 1.3862944) < 1e-3
                and abs(logits[0, 0].item() - 0.75) < 1e-2 and abs(logits[0, 1].item() + 0.25) < 1e-2)
    except Exception as exc:  # noqa: BLE001 - any failure to build or run the kernels means: use the torch path
        log.warning("the Triton softmax kernels do not run on %s (%s: %s); using torch kernels", device,
                    type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return False


def logsumexp_and_target(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """lse[r] = logsumexp(logits[r]), out[r] = logits[r, targets[r]] - lse[r], both fp32."""
    with torch.cuda.device(logits.device):                 # Triton launches on the current device
        _lse_kernel[(logits.shape[0],)](logits, targets, lse, out, logits.shape[1], BLOCK_V=BLOCK_V, num_warps=8)


def logits_to_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor) -> None:
    """logits[r] <- grad_out[r] * (onehot(targets[r]) - softmax(logits[r])), in place, through fp32."""
    with torch.cuda.device(logits.device):
        _grad_kernel[(logits.shape[0],)](logits, targets, lse, grad_out, logits.shape[1], BLOCK_V=BLOCK_V,
                                         num_warps=8)


if triton is not None:
    @triton.jit
    def _lse_kernel(logits, targets, lse, out, vocab, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * vocab
        # one running maximum and sum per lane, merged at the end (an online softmax in BLOCK_V lanes)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)    # a lane past the vocabulary stays 0
            s = s * tl.exp(m - shift) + tl.exp(x - shift)
            m = m_new
        top = tl.max(m, 0)
        total = tl.log(tl.sum(s * tl.exp(m - top), 0)) + top
        target = tl.load(base + tl.load(targets + row)).to(tl.float32)
        tl.store(lse + row, total)
        tl.store(out + row, target - total)

    @triton.jit
    def _grad_kernel(logits, targets, lse, grad_out, vocab, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * vocab
        total = tl.load(lse + row)
        g = tl.load(grad_out + row)
        target = tl.load(targets + row)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < vocab
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            grad = tl.where(cols == target, g, 0.0) - g * tl.exp(x - total)
            tl.store(base + cols, grad.to(logits.dtype.element_ty), mask=inside)
