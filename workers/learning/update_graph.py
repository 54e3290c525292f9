"""The update's forward and backward as CUDA graphs: one captured per bucketed micro-batch shape, then replayed.

A worker's update of GPT-2 124M is bound by the host, not the GPU: ~15 ms of GPU work behind about a
thousand kernel launches that autograd makes one by one (bench/peers_profile.txt), and on a GPU that 8 to
32 workers share, the host's cores are what runs out. Captured, a micro-batch's forward, loss and backward
is one launch. The price is fixed shapes: a round's batch is padded to a bucket (rows to a multiple of the
micro-batch, the prompt to PROMPT_BUCKET, the completion to COMPLETION_BUCKET) with rows and positions that
carry no loss, so the padded batch's gradient is the batch's own.

Only the micro-batches are captured. Clipping, the finiteness check (a decision the host makes) and the
optimizer's step stay eager, as in grpo_step: the step's constants change every step and are kernel
arguments there.
"""

import logging
from dataclasses import dataclass

import torch

from workers.learning.grpo import RolloutBatch, completion_logprobs, grpo_loss, step_if_finite

# Completions are padded to a multiple of this: 8 shapes up to 256 new tokens. A padded position costs
# GPU time the update has to spare (it is bound by launches); a new shape costs a capture (~1 s).
COMPLETION_BUCKET = 32
# Captures one worker keeps at most; past it a new shape is trained eagerly (said once in the log). The paper's
# nine tasks have prompts of up to ~370 tokens: 12 prompt buckets x 8 completion buckets is 96 shapes. They share
# one memory pool, so a shape costs its capture (~1 s) and host memory, not GPU memory of its own.
MAX_GRAPHS = 96
# grpo_step's stats a micro-batch adds, in this order
STATS = ("loss", "clip_fraction", "ratio")

log = logging.getLogger(__name__)


def bucket(width: int, step: int, limit: int) -> int:
    """`width` rounded up to a multiple of `step`, never past `limit` (nor below `width`)."""
    return max(width, min(-(-width // step) * step, limit))


@dataclass
class BucketedGroups:
    """A round's training rows padded for the update's graphs: rows that train nothing, and the widths."""

    prompts: list[list[int]]
    completions: list[list[int]]
    advantages: torch.Tensor
    prompt_width: int
    completion_width: int
    real_rows: int


def pad_for_graphs(prompts: list[list[int]], completions: list[list[int]], advantages: torch.Tensor,
                   pad_id: int, micro_batch: int, prompt_width: int, max_new_tokens: int) -> BucketedGroups:
    """Rows padded to a multiple of `micro_batch`; the completion width to its bucket.

    A padding row is one pad token of prompt and no completion: it attends to something (a row with no
    key at all would be NaN in attention, and NaN times a zero gradient is still NaN), has no completion
    token to train, and gets advantage 0.
    """
    extra = -len(prompts) % micro_batch
    longest = max(map(len, completions))
    return BucketedGroups(
        prompts=prompts + [[pad_id]] * extra, completions=completions + [[]] * extra,
        advantages=torch.cat([advantages, advantages.new_zeros(extra)]), prompt_width=prompt_width,
        completion_width=bucket(max(1, longest), COMPLETION_BUCKET, max_new_tokens), real_rows=len(prompts))


@dataclass
class _Capture:
    """The tensors one captured micro-batch reads and writes, for one (rows, prompt width, completion width)."""

    batch: RolloutBatch
    advantages: torch.Tensor
    total_tokens: torch.Tensor    # the whole batch's completion tokens: each micro-batch's loss is a share
    total_rows: torch.Tensor      # the whole batch's real rows (for sequence normalisation)
    stats: torch.Tensor           # (len(STATS),): this micro-batch's share of grpo_step's stats
    graph: torch.cuda.CUDAGraph | None = None


class UpdateGraphs:
    """grpo_step for one optimizer step without KL, with each micro-batch's forward and backward replayed."""

    def __init__(self, model: torch.nn.Module, micro_batch: int, chunk_size: int, eps_low: float = 0.2,
                 eps_high: float = 0.28, normalize: str = "token", use_graphs: bool | None = None):
        self.model, self.micro_batch, self.chunk_size = model, micro_batch, chunk_size
        # None: graphs on CUDA. False runs the same steps eagerly (the CPU, and the reference the tests compare to)
        self.use_graphs = next(model.parameters()).is_cuda if use_graphs is None else use_graphs
        self.loss_settings = {"eps_low": eps_low, "eps_high": eps_high, "normalize": normalize}
        self.params = [p for p in model.parameters() if p.requires_grad]
        # the graphs accumulate into these addresses: the tensors are owned here, so that a zero_grad(
        # set_to_none=True) elsewhere (an eager step, a skipped one) never hands their memory to another use
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.captures: dict[tuple[int, int, int], _Capture] = {}
        self.broken: str | None = None            # why capturing failed here: every update is eager since
        self.full = False                         # MAX_GRAPHS reached (said once)
        self._pool = None
        self._stream = None

    def step(self, optimizer: torch.optim.Optimizer, batch: RolloutBatch, advantages: torch.Tensor,
             real_rows: int, max_grad_norm: float = 1.0) -> dict[str, float] | None:
        """grpo_step(num_iterations=1, beta=0) on a batch from pad_for_graphs; None when no graph serves it
        (the caller then trains eagerly)."""
        rows = batch.input_ids.shape[0]
        if rows % self.micro_batch:
            raise ValueError(f"UpdateGraphs.step: {rows} rows, not a multiple of the micro-batch {self.micro_batch}")
        capture = self._capture_for(batch, advantages, real_rows)
        if capture is None:
            return None
        total_tokens = batch.completion_mask.sum()
        capture.total_tokens.copy_(total_tokens)
        capture.total_rows.fill_(real_rows)
        torch._foreach_zero_(self.grads)
        self._bind_grads()
        sums = torch.zeros(len(STATS), device=batch.input_ids.device)
        for start in range(0, rows, self.micro_batch):
            _load(capture, batch.rows(slice(start, start + self.micro_batch)),
                  advantages[start:start + self.micro_batch])
            if capture.graph is not None:
                capture.graph.replay()
            else:
                self._forward_backward(capture)
            sums += capture.stats
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        stepped = step_if_finite(optimizer, norm)
        for param in self.params:
            param.grad = None
        values = torch.cat([sums, norm.reshape(1).float(), total_tokens.reshape(1).float()]).tolist()
        return {**dict(zip((*STATS, "grad_norm", "tokens"), values)), "skipped_steps": float(not stepped)}

    def prepare(self, batch: RolloutBatch, real_rows: int) -> bool:
        """Capture the graph of this batch's shape now, stepping nothing; whether a graph serves it."""
        zeros = batch.completion_mask.new_zeros(batch.input_ids.shape[0])
        return self._capture_for(batch, zeros, real_rows) is not None

    def _bind_grads(self) -> None:
        for param, grad in zip(self.params, self.grads):
            param.grad = grad

    def _capture_for(self, batch: RolloutBatch, advantages: torch.Tensor, real_rows: int) -> _Capture | None:
        key = (self.micro_batch, batch.prompt_len, batch.input_ids.shape[1])
        if key in self.captures:
            return self.captures[key]
        if self.broken is not None:
            return None
        if len(self.captures) >= MAX_GRAPHS:
            if self.use_graphs and not self.full:
                self.full = True
                log.warning("the update has %d CUDA graphs, the most a worker keeps: batches of other shapes (%d rows "
                            "x %d + %d tokens, and later ones) train eagerly", MAX_GRAPHS, key[0], key[1],
                            key[2] - key[1])
            return None
        part, device = slice(0, self.micro_batch), batch.input_ids.device
        capture = _Capture(batch=_clone(batch.rows(part)), advantages=advantages[part].clone(),
                           total_tokens=batch.completion_mask.sum(), stats=torch.zeros(len(STATS), device=device),
                           total_rows=torch.full((), float(real_rows), device=device))
        if not self.use_graphs:
            self.captures[key] = capture
            return capture
        try:
            self._record(capture)
        except torch.OutOfMemoryError:
            raise       # not the capture's fault: the worker's restart with smaller batches handles it
        except RuntimeError as exc:
            # whatever the model's forward does that a capture refuses (a host sync): train eagerly from now on
            self.broken = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log.warning("the update cannot be captured as a CUDA graph (%s); every update runs eagerly", self.broken)
            return None
        finally:
            # the warm-up's gradient is not the step's: step() zeroes them before the first replay anyway
            for param in self.params:
                param.grad = None
        self.captures[key] = capture
        log.info("captured the update for %d rows x (%d + %d) tokens (%d shapes)", key[0], key[1],
                 key[2] - key[1], len(self.captures))
        return capture

    def _record(self, capture: _Capture) -> None:
        # one side stream for every warm-up and capture (cuBLAS keeps a workspace per stream), and one pool:
        # the captures never run at once, so each needs the memory of its own micro-batch only, not all of them
        if self._stream is None:
            self._stream = torch.cuda.Stream(capture.batch.input_ids.device)
            self._pool = torch.cuda.graph_pool_handle()
        self._bind_grads()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self._forward_backward(capture)          # the warm-up: lazy initialisations happen outside capture
        torch.cuda.current_stream().wait_stream(self._stream)
        # the warm-up's blocks stay cached for the side stream: handed back before the capture takes the same
        # amount again in its pool, or the worker would peak at twice an update's memory here (NVML sees it)
        torch.cuda.synchronize(self._stream.device)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            self._forward_backward(capture)
        capture.graph = graph

    def _forward_backward(self, c: _Capture) -> None:
        # autocast's cache of bf16 weights would keep a capture's casts for the next one: off inside a graph
        device = c.batch.input_ids.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda", cache_enabled=False):
            logp = completion_logprobs(self.model, c.batch, self.chunk_size)
            # one step on the batch: pi_old is this forward's own policy, so the ratio is exactly 1
            loss, stats = grpo_loss(logp, logp.detach(), c.advantages, c.batch.completion_mask,
                                    total_tokens=c.total_tokens, total_rows=c.total_rows, **self.loss_settings)
        loss.backward()
        with torch.no_grad():
            share = c.batch.completion_mask.sum() / c.total_tokens.clamp(min=1)
            c.stats.copy_(torch.stack([stats["loss"], stats["clip_fraction"] * share, stats["ratio"] * share]))


def _clone(batch: RolloutBatch) -> RolloutBatch:
    return RolloutBatch(batch.input_ids.clone(), batch.attention_mask.clone(), batch.position_ids.clone(),
                        batch.completion_mask.clone(), batch.prompt_len)


def _load(capture: _Capture, batch: RolloutBatch, advantages: torch.Tensor) -> None:
    """A micro-batch into the capture's input tensors (same shape: one bucket)."""
    capture.batch.input_ids.copy_(batch.input_ids)
    capture.batch.attention_mask.copy_(batch.attention_mask)
    capture.batch.position_ids.copy_(batch.position_ids)
    capture.batch.completion_mask.copy_(batch.completion_mask)
    capture.advantages.copy_(advantages)
