"""`python -m bench.train_probe OUT_DIR`: where a train step's time goes, and what each of its parts costs.

Times the optimizer step alone (torch AdamW fused fp32, the bf16-moment step in torch kernels, the same
in one Triton kernel per parameter), the head's gradient accumulation, the train-step set-ups of
bench/RESULTS.md, and writes a torch-profiler table of one naive and one worker-default step.
"""

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.memory_probe import NAIVE_SETUP, WORKER_SETUP, _batch, _optimizer, _step, measure_train
from bench.workload import MODEL
from workers.learning.model import enable_activation_checkpointing, load_policy
from workers.learning.optim import AdamWBf16Moments


def _median_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def optimizer_times(cache: Path) -> dict:
    policy = load_policy(MODEL, "cuda:0", cache)
    params = list(policy.model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name, make in {"torch_fused_fp32": lambda: torch.optim.AdamW(params, lr=1e-5, fused=True),
                       "bf16_torch_kernels": lambda: AdamWBf16Moments(params, lr=1e-5, use_triton=False),
                       "bf16_triton": lambda: AdamWBf16Moments(params, lr=1e-5, use_triton=True)}.items():
        opt = make()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out[name] = {"ms": _median_ms(opt.step)}
        out[name]["step_temporaries_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del opt
    return out


def head_accumulate_times() -> dict:
    """grad_w += grad.T @ h over 16 chunks of 256 rows: a bf16 product added to fp32, or fp32 out of the GEMM."""
    vocab, d, rows = 50257, 768, 256
    grads = [torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) for _ in range(16)]
    hs = [torch.randn(rows, d, device="cuda", dtype=torch.bfloat16) for _ in range(16)]
    acc = torch.zeros(vocab, d, device="cuda")
    out = {}

    def plain():
        for g, h in zip(grads, hs):
            acc.add_(g.t() @ h)

    out["bf16_product_then_add_ms"] = _median_ms(plain)
    ref = torch.zeros_like(acc)
    for g, h in zip(grads, hs):
        ref += g.t().float() @ h.float()
    acc.zero_()
    plain()
    out["bf16_product_rel_err"] = ((acc - ref).norm() / ref.norm()).item()
    try:
        def fused():
            for g, h in zip(grads, hs):
                torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)

        out["fp32_out_addmm_ms"] = _median_ms(fused)
        acc.zero_()
        fused()
        out["fp32_out_addmm_rel_err"] = ((acc - ref).norm() / ref.norm()).item()
    except (RuntimeError, TypeError) as exc:
        out["fp32_out_addmm_error"] = str(exc).splitlines()[0][:200]
    return out


def profile_step(cache: Path, setup: dict) -> str:
    policy = load_policy(MODEL, "cuda:0", cache)
    if setup.get("ckpt"):
        enable_activation_checkpointing(policy.model)
    policy.model.train()
    optimizer = _optimizer(policy.model, setup["opt"])
    batch = _batch(policy, 16, 256)
    adv = torch.randn(16, device=policy.device)
    for _ in range(2):
        _step(policy, optimizer, batch, adv, setup)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _step(policy, optimizer, batch, adv, setup)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cache = Path("/tmp/rlcache")
    results = {"optimizer": optimizer_times(cache), "head_accumulate": head_accumulate_times()}
    print(json.dumps(results, indent=1), flush=True)
    no_ckpt = {**WORKER_SETUP, "name": "ours no ckpt", "ckpt": False}
    setups = [NAIVE_SETUP, WORKER_SETUP, {**WORKER_SETUP, "name": "ours, bf16 moments in torch kernels",
                                          "opt": "bf16-torch"},
              no_ckpt, {**no_ckpt, "name": "ours no ckpt fp32 AdamW", "opt": "fp32"},
              {**WORKER_SETUP, "name": "ours chunk 1024", "chunk": 1024},
              {**WORKER_SETUP, "name": "ours chunk 4096", "chunk": 4096}]
    results["train"] = []
    for setup in setups:
        row = measure_train(cache, setup)
        results["train"].append({k: row[k] for k in ("name", "seconds", "peak_alloc_gib", "peak_reserved_gib")})
        print(json.dumps(results["train"][-1]), flush=True)
    (out / "train_probe.json").write_text(json.dumps(results, indent=1))
    for name, setup in (("naive", NAIVE_SETUP), ("ours", WORKER_SETUP)):
        table = profile_step(cache, setup)
        (out / f"profile_train_{name}.txt").write_text(table)
        print(f"--- {name}\n" + "\n".join(table.splitlines()[:22]), flush=True)


if __name__ == "__main__":
    main()
