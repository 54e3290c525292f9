"""`python -m bench.sdpa_equal`: the same update's log-probs and gradient with and without cuDNN's attention."""

import json
import random

import torch

from bench.sdpa_probe import padded_batch
from bench.workload import MODEL
from workers.learning.grpo import completion_logprobs
from workers.learning.model import load_policy


def grads(policy, batch, cudnn: bool):
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    policy.model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logp = completion_logprobs(policy.model, batch)
    (-(logp * batch.completion_mask).sum() / batch.completion_mask.sum()).backward()
    flat = torch.cat([p.grad.flatten().float() for p in policy.model.parameters() if p.grad is not None])
    return logp.detach().float(), flat


def main() -> None:
    import tempfile
    from pathlib import Path

    policy = load_policy(MODEL, "cuda:0", Path(tempfile.mkdtemp()))
    batch = padded_batch(policy, 60, 40, random.Random(1))
    mask = batch.completion_mask.bool()
    (la, ga), (lb, gb) = grads(policy, batch, True), grads(policy, batch, False)
    (lc, gc) = grads(policy, batch, True)        # the noise floor: cuDNN against itself
    print(json.dumps({"logp_max_abs_diff": (la - lb)[mask].abs().max().item(),
                      "logp_max_abs_diff_cudnn_twice": (la - lc)[mask].abs().max().item(),
                      "grad_cosine": torch.nn.functional.cosine_similarity(ga, gb, dim=0).item(),
                      "grad_rel_norm_diff": ((ga - gb).norm() / ga.norm()).item()}))


if __name__ == "__main__":
    main()
