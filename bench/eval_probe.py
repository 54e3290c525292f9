"""What a held-out evaluation costs, by batch width: the greedy answers of a swarm's warmed-up base, each generate
call timed with its longest answer (a call runs until its last row ends, or MAX_NEW_TOKENS), and the memory the
sampler reserves for the wider batches.

    python -m bench.eval_probe EXPERIMENT_DIR OUT.json [WIDTH ...]     (on the GPU, after a bench swarm part)

The environment gives the swarm's settings (MODEL_NAME, TASKS, MAX_NEW_TOKENS, EVAL_SIZE), as for `rl-swarm up`.
On CUDA the workers evaluate in batches of a round's rows (8 at the defaults), so that the sampler's KV cache
keeps the size the round gave it; this measures what a wider batch would save and cost.
"""

import json
import sys
import time
from pathlib import Path

import torch

from configs_env import SwarmConfig
from workers.evaluation import greedy_answers, held_out_questions
from workers.learning.model import load_policy
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.signing import KeyRing
from workers.warmup import load_base

WIDTHS = (8, 16, 32)


def timed_calls(policy, questions, max_new_tokens: int, width: int) -> dict:  # noqa: ANN001 - a Policy
    """Every generate call of one evaluation at `width` prompts a call: seconds, longest answer, hits."""
    on_cuda = policy.device.type == "cuda"
    calls, hits = [], 0
    for start in range(0, len(questions), width):
        if on_cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        answers = greedy_answers(policy, questions[start:start + width], max_new_tokens, fast=True, batch_size=width)
        if on_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        hits += sum(answer.hit for answer in answers)
        calls.append({"seconds": round(seconds, 4), "longest": max(answer.tokens for answer in answers),
                      "cut_off": sum(not answer.finished for answer in answers)})
    return {"width": width, "seconds": round(sum(c["seconds"] for c in calls), 4), "calls": calls,
            "accuracy": hits / max(1, len(questions))}


def main() -> None:
    experiment, out = Path(sys.argv[1]), Path(sys.argv[2])
    widths = sorted(int(w) for w in sys.argv[3:]) or list(WIDTHS)
    cfg = SwarmConfig.from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    policy = load_policy(cfg.model_name, device, cfg.cache_dir)
    folder = ExperimentFolder(experiment)
    based = load_base(experiment, policy, KeyRing.for_viewing(folder, cfg.cache_dir), unsigned_ok=False)
    questions = held_out_questions(cfg.tasks, cfg.eval_size)
    reserved = (lambda: torch.cuda.memory_reserved(device) / 2**20) if device.type == "cuda" else (lambda: None)
    loaded, rows = reserved(), []
    for width in widths:             # widest last: each row's reserved memory is the most any width so far needed
        timed_calls(policy, questions[:width], cfg.max_new_tokens, width)      # the width's graphs, captured
        row = timed_calls(policy, questions, cfg.max_new_tokens, width)
        row["reserved_mib"] = reserved()
        print(f"width {width}: {row['seconds']:.3f} s in {len(row['calls'])} calls, longest answers "
              f"{[c['longest'] for c in row['calls']]}, accuracy {row['accuracy']:.2f}", flush=True)
        rows.append(row)
    out.write_text(json.dumps({"model": cfg.model_name, "warmed_base": based, "questions": len(questions),
                               "max_new_tokens": cfg.max_new_tokens, "device": str(device), "torch": torch.__version__,
                               "reserved_mib_loaded": loaded, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
