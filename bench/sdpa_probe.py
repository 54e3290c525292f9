"""`python -m bench.sdpa_probe OUT.json`: what a new batch shape costs an update, per attention backend.

A worker's update batch is as wide as its round's longest prompt + completion, so its shape changes from
round to round. This times one worker-default update (checkpointing, micro 16, bf16 moments, left-padded
prompts) at widths never seen before and at a width seen many times, with torch's default SDPA backends
and with cuDNN's attention switched off, to tell whether building kernels for new shapes is what an
update pays for.
"""

import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.workload import MODEL
from workers.learning.grpo import build_batch, grpo_step
from workers.learning.model import enable_activation_checkpointing, load_policy
from workers.learning.optim import AdamWBf16Moments

ROWS = 16


def padded_batch(policy, prompt_len: int, completion_len: int, rng: random.Random):
    """ROWS random rows, prompts up to 7 tokens short of `prompt_len` (left padding), one completion full width."""
    prompts = [[rng.randrange(100, 50000) for _ in range(prompt_len - rng.randrange(0, 8))] for _ in range(ROWS)]
    completions = [[rng.randrange(100, 50000) for _ in range(rng.randrange(1, completion_len + 1))]
                   for _ in range(ROWS - 1)] + [[7] * completion_len]
    return build_batch(prompts, completions, pad_id=policy.tokenizer.eos_token_id, device=policy.device)


def _timed_step(policy, optimizer, batch, skipped: list) -> float:
    """Seconds of one update; a step grpo_step skipped (a gradient not finite) is counted in `skipped`, since a
    skipped step is cheaper and would flatter the backend that caused it."""
    adv = torch.randn(ROWS, device=policy.device)
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stats = grpo_step(policy.model, optimizer, batch, adv, chunk_size=256, micro_batch_size=16)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    skipped.append(int(stats.get("skipped_steps", 0)) or int(not math.isfinite(stats["loss"])))
    return seconds


def probe(cache: Path, cudnn: bool, widths: list[int], repeats: int) -> dict:
    policy = load_policy(MODEL, "cuda:0", cache)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)          # workers switch it off around their updates only
    enable_activation_checkpointing(policy.model)
    policy.model.train()
    optimizer = AdamWBf16Moments(policy.model.parameters(), lr=1e-7)
    rng = random.Random(0)
    same = padded_batch(policy, 60, 20, rng)
    skipped: list[int] = []
    for _ in range(3):
        _timed_step(policy, optimizer, same, skipped)
    repeated = [_timed_step(policy, optimizer, same, skipped) for _ in range(repeats)]
    new = [_timed_step(policy, optimizer, padded_batch(policy, 60, width, rng), skipped) for width in widths]
    del policy, optimizer
    torch.cuda.empty_cache()
    return {"cudnn_sdp": cudnn, "repeated_shape_median_s": statistics.median(repeated),
            "new_shape_median_s": statistics.median(new), "new_shapes": len(widths),
            "steps": len(skipped), "skipped_or_not_finite_steps": sum(skipped)}


def main() -> None:
    import tempfile

    out = Path(sys.argv[1])
    cache = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp())
    rows = [probe(cache, cudnn, list(range(21, 21 + 30)) if cudnn else list(range(51, 51 + 30)), 20)
            for cudnn in (True, False)]
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
                              indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
