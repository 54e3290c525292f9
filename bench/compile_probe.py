"""`python -m bench.compile_probe OUT_DIR`: the train step with torch.compile, and lighter checkpointing in eager."""

import gc
import json
import sys
import time
from pathlib import Path

import torch

from bench.memory_probe import WORKER_SETUP, _batch, _optimizer, _step
from bench.workload import MODEL
from workers.learning.model import load_policy


def run(cache: Path, name: str, compile_budget: float | None, ckpt_kwargs: dict | None) -> dict:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    policy = load_policy(MODEL, "cuda:0", cache)
    if ckpt_kwargs is not None:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if compile_budget is not None:
        torch._functorch.config.activation_memory_budget = compile_budget
        policy.model.transformer.compile(dynamic=True)
    policy.model.train()
    optimizer = _optimizer(policy.model, "bf16")
    setup = {**WORKER_SETUP, "ckpt": False}
    shapes = {"A": _batch(policy, 16, 256), "B": _batch(policy, 16, 200), "C": _batch(policy, 12, 37)}
    adv = torch.randn(16, device="cuda")
    out = {"name": name}
    for key in ("A", "B", "C"):
        started = time.perf_counter()
        _step(policy, optimizer, shapes[key], adv[:shapes[key].input_ids.shape[0]], setup)
        torch.cuda.synchronize()
        out[f"first_{key}_s"] = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(5):
        _step(policy, optimizer, shapes["A"], adv, setup)
    torch.cuda.synchronize()
    out["seconds"] = (time.perf_counter() - started) / 5
    out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    del policy, optimizer, shapes
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    cache = Path("/tmp/rlcache")
    light = {"use_reentrant": False, "preserve_rng_state": False, "determinism_check": "none"}
    runs = [("eager, HF ckpt (worker default)", None, {"use_reentrant": False}),
            ("eager, HF ckpt, no rng/determinism", None, light),
            ("eager, HF ckpt reentrant", None, {"use_reentrant": True, "preserve_rng_state": False}),
            ("compile, no ckpt", 1.0, None),
            ("compile, memory budget 0.3", 0.3, None),
            ("compile, memory budget 0.05", 0.05, None),
            ("compile + HF ckpt", 1.0, light)]
    results = []
    for name, budget, ckpt in runs:
        try:
            row = run(cache, name, budget, ckpt)
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result
            row = {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results.append(row)
        print(json.dumps(row), flush=True)
        (out_dir / "compile_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
