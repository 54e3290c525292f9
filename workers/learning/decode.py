"""GPT-2 sampling written out: a static KV cache, and on CUDA one decode step replayed as a CUDA graph.

`model.generate` spends most of a GPT-2 124M decode step in Python and kernel launches (bench/NOTES.md):
~10 ms a step at batch 16 for ~1 ms of GPU work. Here a step (the forward of one token per row, the
sampling and the EOS bookkeeping) is captured once per (rows, cache length, greedy) and replayed, so
a step costs one launch. The weights are the model's own fp32 parameters, read in place (an update is
seen by the next replay, no copy is kept); matmuls run in TF32 and the cache and attention in bf16 on
CUDA, the model's dtype elsewhere.

Sampling is the same as `generate(do_sample=True, temperature=T, top_k=0, top_p=1.0)`: the Gumbel-max
trick (argmax of logits / T plus Gumbel noise) draws from softmax(logits / T) exactly, and needs no
host sync inside the graph the way `torch.multinomial` would.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Every this many steps the host asks whether every row has finished: one sync per CHECK_EVERY steps
# instead of generate's one per step, for at most CHECK_EVERY - 1 steps of padding computed in vain.
CHECK_EVERY = 8
# Prompt tokens the cache has room for at least. Each row of 64 + 256 positions is ~11 MiB of GPT-2 124M
# cache, held through the update, so the floor is low: a worker sizes it for its longest prompts by
# rehearsing its largest round (workers.round_loop.rehearse_largest_round).
PROMPT_RESERVE = 64


def supports(model: torch.nn.Module) -> bool:
    """True for the GPT-2 architecture as transformers builds it, with the attention this file writes out."""
    config = getattr(model, "config", None)
    return (type(model).__name__ == "GPT2LMHeadModel" and config is not None
            and getattr(config, "activation_function", None) in ("gelu_new", "gelu_pytorch_tanh")
            and getattr(config, "scale_attn_weights", True)
            and not getattr(config, "scale_attn_by_inverse_layer_idx", False)
            and not getattr(config, "add_cross_attention", False))


@dataclass
class _Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor      # (d, 3d): transformers' Conv1D keeps weights as (in, out)
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor


class _Step:
    """The tensors one captured decode step reads and writes, for one (rows, cache length, greedy)."""

    def __init__(self, rows: int, length: int, max_new: int, device: torch.device):
        long = {"dtype": torch.long, "device": device}
        self.token = torch.zeros(rows, **long)            # the last sampled token of each row
        self.pad = torch.zeros(rows, **long)              # left padding of each row's prompt
        self.real = torch.zeros(rows, **long)             # real prompt tokens of each row
        self.width = torch.zeros(1, **long)               # padded prompt width
        self.step = torch.zeros(1, **long)                # index of the token this step samples
        self.min_new = torch.zeros(1, **long)
        self.temperature = torch.ones(1, dtype=torch.float32, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.out = torch.zeros(rows, max_new, **long)
        self.keys = torch.arange(length, **long)
        self.graph: "torch.cuda.CUDAGraph | None" = None


class GPT2Decoder:
    """Samples from a GPT2LMHeadModel; keep one per model (the cache and graphs are reused across calls)."""

    def __init__(self, model: torch.nn.Module, use_graphs: bool | None = None):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a GPT-2 model this decoder writes out")
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.heads = self.config.n_head
        self.eps = self.config.layer_norm_epsilon
        self.cache_dtype = torch.bfloat16 if self.device.type == "cuda" else next(model.parameters()).dtype
        self.context = int(self.config.n_positions)
        self._cache: torch.Tensor | None = None           # (layers, 2, rows, heads, length, head_dim)
        self._steps: dict[tuple[int, int, bool, int], _Step] = {}
        self._pool = None
        self._stream: "torch.cuda.Stream | None" = None
        self._weights_at: tuple[int, ...] = ()

    # -- the model, written out -------------------------------------------------------------------------
    def _layers(self) -> list[_Layer]:
        blocks = self.model.transformer.h
        return [_Layer(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                       b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                       b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in blocks]

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, write: torch.Tensor,
                 allowed: torch.Tensor) -> torch.Tensor:
        """Last-position logits (rows, vocab) in fp32 of `tokens` (rows, n) at `positions`, whose keys and
        values go to cache slots `write` (n,); `allowed` (rows, 1, n, length) says which slots each attends."""
        t = self.model.transformer
        rows, n = tokens.shape
        d = self.config.n_embd
        head_dim = d // self.heads
        x = t.wte.weight[tokens] + t.wpe.weight[positions]
        for i, layer in enumerate(self._layers()):
            h = F.layer_norm(x, (d,), layer.ln1_w, layer.ln1_b, self.eps)
            qkv = torch.addmm(layer.qkv_b, h.view(-1, d), layer.qkv_w).to(self.cache_dtype)
            q, k, v = qkv.view(rows, n, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            cache[i, 0].index_copy_(2, write, k)
            cache[i, 1].index_copy_(2, write, v)
            attn = F.scaled_dot_product_attention(q, cache[i, 0], cache[i, 1], attn_mask=allowed,
                                                  scale=1.0 / math.sqrt(head_dim))
            attn = attn.transpose(1, 2).reshape(rows * n, d).to(x.dtype)
            x = x + torch.addmm(layer.proj_b, attn, layer.proj_w).view(rows, n, d)
            h = F.layer_norm(x, (d,), layer.ln2_w, layer.ln2_b, self.eps).view(-1, d)
            h = F.gelu(torch.addmm(layer.fc_b, h, layer.fc_w), approximate="tanh")
            x = x + torch.addmm(layer.out_b, h, layer.out_w).view(rows, n, d)
        last = F.layer_norm(x[:, -1], (d,), t.ln_f.weight, t.ln_f.bias, self.eps)
        return (last @ self.model.lm_head.weight.t()).float()

    def _pick(self, logits: torch.Tensor, s: _Step, greedy: bool, eos: int) -> torch.Tensor:
        """Sample (or take the argmax of) each row's next token; EOS is barred before min_new tokens, and a
        finished row repeats EOS (GPT-2's pad), as generate does."""
        # in place, with a device-side condition: a graph may neither branch on the step nor copy from the host
        logits[:, eos] += torch.where(s.step < s.min_new, -torch.inf, 0.0)
        if not greedy:
            noise = torch.rand_like(logits)
            # Gumbel-max: argmax(l / T - log(-log u)) is a draw from softmax(l / T)
            logits = logits / s.temperature - torch.log(-torch.log(noise))
        picked = torch.where(s.finished, torch.full_like(s.token, eos), logits.argmax(dim=-1))
        s.finished |= picked == eos
        s.out.index_copy_(1, s.step, picked[:, None])
        s.token.copy_(picked)
        return picked

    def _decode_step(self, s: _Step, cache: torch.Tensor, greedy: bool, eos: int) -> None:
        """Feed each row's last token, sample the next: everything here reads and writes `s`, nothing else."""
        slot = s.width + s.step - 1
        positions = (s.real + s.step - 1)[:, None]
        allowed = ((s.keys >= s.pad[:, None]) & (s.keys <= slot))[:, None, None, :]
        logits = self._forward(s.token[:, None], positions, cache, slot, allowed)
        self._pick(logits, s, greedy, eos)
        s.step += 1

    # -- memory: one cache for every shape, graphs that share one pool ----------------------------------
    def _cache_for(self, rows: int, length: int, max_new: int) -> torch.Tensor:
        cache = self._cache
        if cache is None or cache.shape[2] < rows or cache.shape[4] < length:
            keep_rows, keep_len = (cache.shape[2], cache.shape[4]) if cache is not None else (0, 0)
            rows, length = max(rows, keep_rows), max(length, keep_len, min(self.context, PROMPT_RESERVE + max_new))
            self._drop_graphs()                                     # they point at the old cache
            self._cache = None
            d = self.config.n_embd
            self._cache = torch.zeros(self.config.n_layer, 2, rows, self.heads, length, d // self.heads,
                                      dtype=self.cache_dtype, device=self.device)
        return self._cache

    def _check_weights(self) -> None:
        # a graph reads parameters by address: anything that replaced a tensor (not an in-place update)
        # would leave the graphs reading stale memory
        now = tuple(p.data_ptr() for p in self.model.parameters())
        if now != self._weights_at:
            self._drop_graphs()
            self._weights_at = now

    def release(self) -> None:
        """Free the cache and the graphs (their pool goes with them); the next call allocates and captures again."""
        self._drop_graphs()
        self._cache = None

    def _drop_graphs(self) -> None:
        # the pool goes with its graphs: a pool whose graphs are all gone cannot take a new capture
        self._steps.clear()
        self._pool = None

    # -- sampling -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int, temperature: float,
                 greedy: bool, eos: int, min_new_tokens: int = 0) -> torch.Tensor:
        """(rows, width + n) like `generate`'s output: the left-padded prompts, then n <= max_new_tokens tokens
        per row, n being where the last row to finish finished."""
        rows, width = input_ids.shape
        if width + max_new_tokens > self.context:
            raise ValueError(f"{width} prompt + {max_new_tokens} new tokens exceed GPT-2's {self.context} positions")
        if max_new_tokens < 1 or rows == 0:
            return input_ids
        self._check_weights()
        length = width + max_new_tokens
        cache_full = self._cache_for(rows, length, max_new_tokens)
        cache = cache_full[:, :, :rows, :, :length]
        key = (rows, length, greedy, max_new_tokens)
        s = self._steps.get(key)
        if s is None:
            s = self._steps[key] = _Step(rows, length, max_new_tokens, self.device)
        with _tf32() if self.device.type == "cuda" else contextlib.nullcontext():
            if self.use_graphs and s.graph is None and max_new_tokens > 1:
                self._capture(s, cache, greedy, eos)
            self._prefill(s, cache, input_ids, attention, temperature, min_new_tokens, greedy, eos)
            done = 1
            while done < max_new_tokens:
                if done % CHECK_EVERY == 0 and bool(s.finished.all()):
                    break
                if s.graph is not None:
                    s.graph.replay()
                else:
                    self._decode_step(s, cache, greedy, eos)
                done += 1
        new = s.out[:, :done]
        # generate stops at the step where the last row finished: drop the EOS padding computed after it
        first_end = (new == eos).int().argmax(dim=1)                 # read only when every row has finished
        all_ended, last_end = torch.stack([s.finished.all().long(), first_end.max()]).tolist()
        n = last_end + 1 if all_ended else done
        return torch.cat([input_ids, new[:, :n]], dim=1)

    def _prefill(self, s: _Step, cache: torch.Tensor, input_ids: torch.Tensor, attention: torch.Tensor,
                 temperature: float, min_new_tokens: int, greedy: bool, eos: int) -> None:
        rows, width = input_ids.shape
        real = attention.sum(dim=1)
        s.pad.copy_(width - real)
        s.real.copy_(real)
        s.width.fill_(width)
        s.step.fill_(0)
        s.min_new.fill_(min_new_tokens)
        s.temperature.fill_(temperature)
        s.finished.fill_(False)
        s.out.fill_(eos)
        # GPT-2 positions count real tokens only; padding sits at position 0 and is never attended
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        slots = torch.arange(width, device=self.device)
        causal = slots[None, :] <= slots[:, None]
        real_key = slots[None, :] >= s.pad[:, None]
        # a padding query may see only itself, so no row of the attention is empty (softmax of nothing is NaN)
        allowed = (causal[None] & real_key[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)[None]
        keys = torch.zeros(rows, width, cache.shape[4], dtype=torch.bool, device=self.device)
        keys[:, :, :width] = allowed
        logits = self._forward(input_ids, positions, cache, slots, keys[:, None])
        self._pick(logits, s, greedy, eos)
        s.step += 1

    def _capture(self, s: _Step, cache: torch.Tensor, greedy: bool, eos: int) -> None:
        # warm up on a side stream (the allocator and cuBLAS settle), then capture; the warm-up's writes
        # to the cache are overwritten or masked by the next prefill
        s.width.fill_(1)
        s.step.fill_(1)
        # one side stream for every warm-up and capture: cuBLAS keeps a workspace per stream it has seen,
        # so a new stream per captured shape would be memory that grows with the shapes met
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                # greedy: the warm-up draws no random numbers, so a seed set before generate gives the same
                # tokens whether or not this call captured (capturing itself advances no generator)
                self._decode_step(s, cache, True, eos)
                s.step.fill_(1)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            self._decode_step(s, cache, greedy, eos)
        s.graph = graph


@contextlib.contextmanager
def _tf32():
    """TF32 matmuls for the fp32 weights: ~8x fp32's tensor throughput, 10 mantissa bits to bf16's 7."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
