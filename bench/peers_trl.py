"""One TRL GRPOTrainer process of `python -m bench peers`: `python -m bench.peers_trl SPEC.json OUT.json`.

It trains the peers' warmed-up base on the questions rl-swarm's worker of the same index draws, round by round,
scored by rl-swarm's own scorer, then answers the held-out questions through rl-swarm's own evaluation. Every
TRL setting is in `grpo_config`; bench/PEERS.md says which differ from rl-swarm's and why.
"""

import json
import os
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from statistics import median

import torch

from configs_env import SwarmConfig
from workers.evaluation import evaluate_held_out, held_out_questions
from workers.learning.model import Policy, default_learning_rate, load_policy
from workers.learning.tasks import Question, TaskMix, build_prompt, score_completion
from workers.profiling import profiled
from workers.round_loop import round_seed
from workers.warmup import load_base
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.signing import KeyRing


def worker_questions(cfg: SwarmConfig, index: int, updates: int) -> list[Question]:
    """The I questions of each round 1..updates of rl-swarm's worker `index`, in order (as play_round draws them)."""
    tasks = TaskMix(cfg.tasks, seed=cfg.seed + index)
    return [q for round_ in range(1, updates + 1)
            for q in tasks.sample(cfg.num_train_samples, random.Random(round_seed(cfg, index, round_)))]


def trl_dataset(questions: list[Question], name: str):
    """The rows TRL reads, in order: the prompt, and what the scorer needs (the entry as JSON text, so arrow need
    not find one schema for every task's metadata).

    Named by a fingerprint of our own: without one, datasets hashes the arrow table with dill, which fails on the
    pyarrow versions small enough to carry to the GPU machine (bench/PEERS.md)."""
    import pyarrow
    from datasets import Dataset
    from datasets.table import InMemoryTable

    rows = [{"prompt": build_prompt(q.question), "task": q.task, "entry": json.dumps(q.entry())} for q in questions]
    return Dataset(InMemoryTable(pyarrow.Table.from_pylist(rows)), fingerprint=name)


def reward_correctness(completions: list[str], task: list[str], entry: list[str], **_: object) -> list[float]:
    """rl-swarm's score_completion on each completion: the reward a worker computes (FORMAT_REWARD is 0)."""
    return [score_completion(t, text, json.loads(e)) for text, t, e in zip(completions, task, entry)]


def grpo_config(cfg: SwarmConfig, spec: dict, on_cuda: bool):
    """TRL's settings for the peers' workload: rl-swarm's where TRL has the option (bench/PEERS.md)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=spec["work_dir"], seed=spec["seed"], max_steps=spec["updates"],
        # one update = 16 completions = 4 questions x G=4, generated and trained once (rl-swarm's I=4, J=0)
        per_device_train_batch_size=cfg.num_train_samples * cfg.num_generations, gradient_accumulation_steps=1,
        num_generations=cfg.num_generations, steps_per_generation=1, num_iterations=cfg.steps_per_round,
        shuffle_dataset=False,                      # the worker's question order
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0,
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=cfg.kl_beta, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, disable_dropout=True,
        bf16=on_cuda, gradient_checkpointing=on_cuda, use_cpu=not on_cuda,
        use_vllm=False, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, remove_unused_columns=False)


def step_clock(deadline: float):
    """A callback keeping each update's end time (wall clock: processes' clocks compare) and stopping the run at
    the bench's deadline."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):    # noqa: ANN001 - transformers' signature
            self.ends.append(time.time())

        def on_step_end(self, args, state, control, **kwargs):       # noqa: ANN001
            self.ends.append(time.time())
            if time.time() > deadline:
                control.should_training_stop = True

    return StepClock()


def step_profiler(step: int, out: Path, device: torch.device):
    """A callback running update `step` (1-based: generation, scoring and training) under torch.profiler, its
    table written to `out` as a swarm worker's PROFILE_ROUND writes its round's."""
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self) -> None:
            self.open = ExitStack()

        def on_step_begin(self, args, state, control, **kwargs):     # noqa: ANN001 - transformers' signature
            if state.global_step + 1 == step:
                self.open.enter_context(profiled(True, out, device, f"TRL update {step}"))

        def on_step_end(self, args, state, control, **kwargs):       # noqa: ANN001
            self.open.close()

    return StepProfiler()


def run(spec: dict) -> dict:
    """Train spec["updates"] updates (fewer if the deadline comes first), then the held-out evaluation."""
    from trl import GRPOTrainer

    cfg = SwarmConfig.from_env(spec["env"])
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    on_cuda = device != "cpu"
    if not on_cuda:
        torch.set_num_threads(max(1, spec.get("threads", 1)))
    policy = load_policy(spec["model"], device, cfg.cache_dir)
    base = ExperimentFolder(Path(spec["base_experiment"]))     # `rl-swarm pretrain`'s, on this machine
    if not load_base(base.root, policy, KeyRing(base), unsigned_ok=False):
        raise SystemExit(f"no warmed-up base in {spec['base_experiment']}")
    spec = {**spec, "learning_rate": cfg.learning_rate or default_learning_rate(spec["model"])}
    questions = worker_questions(cfg, spec["index"], spec["updates"])
    clock = step_clock(spec["deadline"])
    callbacks = [clock] + ([step_profiler(spec["profile_step"], Path(spec["profile_out"]), policy.device)]
                           if spec.get("profile_step") else [])
    trainer = GRPOTrainer(model=policy.model, reward_funcs=reward_correctness, args=grpo_config(cfg, spec, on_cuda),
                          train_dataset=trl_dataset(questions, f"peers-{spec['index']}"),
                          processing_class=policy.tokenizer, callbacks=callbacks)
    trainer.train()
    updates = len(clock.ends) - 1
    seconds = [b - a for a, b in zip(clock.ends, clock.ends[1:])][spec["warmup_updates"]:]
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    trained = Policy(model=model, tokenizer=policy.tokenizer, name=spec["model"], device=policy.device)
    held_out = evaluate_held_out(trained, cfg, held_out_questions(cfg.tasks, cfg.eval_size), f"trl-{spec['index']}",
                                 updates)
    return {"index": spec["index"], "updates": updates, "completions_per_update": cfg.num_train_samples *
            cfg.num_generations, "step_ends": clock.ends, "measured_updates": len(seconds),
            "median_seconds_per_update": median(seconds) if seconds else None,
            "held_out": held_out.accuracy, "held_out_questions": held_out.questions,
            "torch_peak_gib": torch.cuda.max_memory_reserved() / 2**30 if on_cuda else None}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(spec)
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
