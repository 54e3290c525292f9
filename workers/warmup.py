"""Supervised warm-up: teach the base model the answer format before RL, so rewards are not all zero.

GPT-2 (and any model without instruction tuning) almost never writes `<answer>...</answer>`, so every
group has equal rewards and GRPO has no gradient. A short SFT on question -> `<answer>gold</answer>`
pairs from the experiment's own tasks gives a policy that is partly right, which RL can improve.
The result is saved once as the experiment's base in the shared folder; every worker starts from it.
"""

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from configs_env import SwarmConfig, SwarmError
from workers.shared_folder.base_meta import BASE_WEIGHTS, sign_base_meta, signed_base_meta
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.leftovers import make_temp_dir, swap_in
from workers.shared_folder.safe_io import sync_folder
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey, file_sha256, local_key_dir
from workers.weights import SLACK_BYTES, load_weights, model_bytes, read_checked
from workers.evaluation import EVAL_BATCH, accuracy_by_task, greedy_hits, held_out_questions
from workers.learning.generation import encode_prompt
from workers.learning.grpo import build_batch, completion_logprobs, step_if_finite
from workers.learning.model import (Policy, default_warmup_lr, enable_activation_checkpointing,
                                   update_attention, use_activation_checkpointing)
from workers.learning.tasks import Question, TaskMix, build_prompt

log = logging.getLogger(__name__)

EVAL_QUESTIONS = 64         # held-out questions when EVAL_SIZE=0 turns the workers' evaluation off
# steps between checks of WARMUP_TARGET_ACCURACY: a greedy pass over the held-out questions (EVAL_SIZE of them,
# up to MAX_NEW_TOKENS each) costs tens of steps when the model does not stop yet, a few once it does
TARGET_CHECK_EVERY = 50
# steps whose gradient may be skipped as not finite before the warm-up gives up: one is a bad batch, many are a
# learning rate the model cannot take, and the weights they leave must not become every worker's start
MAX_SKIPPED_STEPS = 10


class WarmupDiverged(SwarmError):
    """The warm-up's gradients or weights stopped being finite; nothing was saved."""


@dataclass(frozen=True)
class WarmupReport:
    model_name: str
    steps: int
    final_loss: float | None         # the last measured step's loss; None when no step was measured
    greedy_accuracy_before: float
    greedy_accuracy_after: float
    seconds: float
    target_accuracy: float = 0.0     # WARMUP_TARGET_ACCURACY; 0: the warm-up ran its WARMUP_STEPS
    stopped_by: str = "steps"        # "target": the target was reached after `steps`; "steps": the budget ran out
    checks: tuple[tuple[int, float], ...] = ()      # (step, held-out accuracy) of each WARMUP_TARGET_ACCURACY check
    by_task: dict[str, float] = field(default_factory=dict)     # the final held-out accuracy, task by task
    skipped_steps: int = 0           # steps whose gradient was not finite, so the weights did not move

    def stop_note(self) -> str:
        """Which stop happened, for the CLI's one line."""
        if self.target_accuracy <= 0:
            return ""
        if self.stopped_by == "target":
            return f", target {self.target_accuracy:.0%} reached at step {self.steps}"
        return f", target {self.target_accuracy:.0%} not reached: all {self.steps} WARMUP_STEPS spent"


def target_text(answer: str) -> str:
    return f" <answer>{answer}</answer>"


def _checked_hits(policy: Policy, questions: list[Question], max_new_tokens: int) -> list[bool]:
    """greedy_hits without moving the training RNG (it re-seeds): checks change no step of the warm-up."""
    devices = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return greedy_hits(policy, questions, max_new_tokens, fast=True, batch_size=EVAL_BATCH)


def _accuracy(hits: list[bool]) -> float:
    return sum(hits) / max(1, len(hits))


def _supervised_step(policy: Policy, questions: list[Question], optimizer: torch.optim.Optimizer,
                     max_new_tokens: int) -> tuple[torch.Tensor, bool]:
    """One step of cross-entropy on `<answer>gold</answer>` + EOS after each prompt: the loss, on the device,
    and whether the weights moved (a gradient that is not finite is skipped, as in the workers' update)."""
    eos = policy.tokenizer.eos_token_id
    # prompt and target are tokenised apart, exactly as generation sees them (BPE merges across the
    # boundary would otherwise teach the model a prompt ending it never sees)
    prompts = [encode_prompt(policy, build_prompt(q.question), max_new_tokens) for q in questions]
    targets = [policy.tokenizer(target_text(q.answer), add_special_tokens=False)["input_ids"] + [eos]
               for q in questions]
    batch = build_batch(prompts, targets, pad_id=eos, device=policy.device)
    with update_attention(policy.device):
        logp = completion_logprobs(policy.model, batch)
        loss = -(logp * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
    return loss, step_if_finite(optimizer, norm)


def _weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def supervised_warmup(policy: Policy, cfg: SwarmConfig, on_step: Callable[[int, float], None] = lambda *_: None,
                      on_check: Callable[[int, float], None] = lambda *_: None) -> WarmupReport:
    """WARMUP_STEPS steps, or fewer when WARMUP_TARGET_ACCURACY is set and a check every TARGET_CHECK_EVERY
    steps finds the held-out greedy accuracy at or above it."""
    started = time.monotonic()
    # the questions and length of the workers' held-out evaluation, so "after" is their round-0 number
    held_out = held_out_questions(cfg.tasks, cfg.eval_size or EVAL_QUESTIONS)
    hits = _checked_hits(policy, held_out, cfg.max_new_tokens)
    before = accuracy = _accuracy(hits)
    train_tasks = TaskMix(cfg.tasks, seed=cfg.seed + 7919)
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.warmup_lr or default_warmup_lr(policy.name),
                                  weight_decay=0.0)
    target = cfg.warmup_target_accuracy
    reached = target > 0 and before >= target
    # dropout draws from the seed, not from whatever the process ran before
    torch.manual_seed(cfg.seed)
    policy.model.train()
    # activations recomputed in backward: with every activation kept, a 32-question batch of the paper's tasks
    # (prompts up to ~370 tokens) held ~20 GiB per warm-up on an H200, and six of them left no room for a swarm
    # beside them. The warm-up stays in fp32: under bf16 autocast (tried on an H200) the default preset's
    # warm-up ended 5-8 points lower on each of three seeds, and the paper preset's with a NaN loss
    if use_activation_checkpointing(cfg.gradient_checkpointing, policy.device):
        enable_activation_checkpointing(policy.model)
    loss_value = None
    step, checks, skipped = 0, [], 0
    while step < cfg.warmup_steps and not reached:
        step += 1
        loss, stepped = _supervised_step(policy, train_tasks.sample(cfg.warmup_batch_size, rng), optimizer,
                                         cfg.max_new_tokens)
        if not stepped:
            skipped += 1
            log.warning("warm-up step %d skipped: its gradient was not finite (loss %s)", step, loss.item())
        if skipped >= MAX_SKIPPED_STEPS or (step == cfg.warmup_steps and skipped == step):
            raise WarmupDiverged(_diverged(cfg, policy, f"its gradient was not finite in {skipped} of {step} steps"))
        check = target > 0 and step % TARGET_CHECK_EVERY == 0 and step < cfg.warmup_steps
        if stepped and (step % 10 == 0 or step == cfg.warmup_steps or check):
            loss_value = loss.item()
        on_step(step, float("nan") if loss_value is None else loss_value)     # NaN: not measured yet
        if check:
            hits = _checked_hits(policy, held_out, cfg.max_new_tokens)
            accuracy = _accuracy(hits)
            checks.append((step, accuracy))
            on_check(step, accuracy)
            reached = accuracy >= target
    if not _weights_finite(policy.model):
        raise WarmupDiverged(_diverged(cfg, policy, f"its weights were not finite after {step} steps"))
    if not reached:     # the step budget ran out (or there is no target): measure the result once
        hits = _checked_hits(policy, held_out, cfg.max_new_tokens)
        accuracy = _accuracy(hits)
        reached = target > 0 and accuracy >= target
    return WarmupReport(model_name=policy.name, steps=step, final_loss=loss_value,
                        greedy_accuracy_before=before, greedy_accuracy_after=accuracy,
                        seconds=time.monotonic() - started, target_accuracy=target,
                        stopped_by="target" if reached else "steps", checks=tuple(checks),
                        by_task=accuracy_by_task(held_out, hits), skipped_steps=skipped)


def _diverged(cfg: SwarmConfig, policy: Policy, what: str) -> str:
    lr = cfg.warmup_lr or default_warmup_lr(policy.name)
    return (f"the warm-up of {policy.name} diverged: {what} (WARMUP_LR={lr:g}); nothing was saved: "
            f"set a lower WARMUP_LR, or WARMUP_STEPS=0 to start from the model as it is")


def base_dir(experiment_root: Path) -> Path:
    return ExperimentFolder(experiment_root).base_dir


def save_base(experiment_root: Path, policy: Policy, report: WarmupReport, key: NodeKey) -> Path:
    """Temp folder, fsync, rename: a half-written base is never seen. Its meta.json is signed by the experiment's
    coordinator `key`, with the SHA-256 of the weights, which every worker checks before it starts from them."""
    final = base_dir(experiment_root)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final)
    save_model(policy.model, str(tmp / BASE_WEIGHTS))
    # no NaN: the readers skip a meta.json that holds one, and would start every worker from scratch
    record = sign_base_meta(asdict(report), file_sha256(tmp / BASE_WEIGHTS), key)
    with open(tmp / "meta.json", "w", encoding="utf-8") as f:
        json.dump(record, f, allow_nan=False)
    # the weights too: a whole meta.json beside weights a power cut emptied would pass for a base
    sync_folder(tmp, files=True)
    swap_in(tmp, final)         # a base warmed up over a refused one: never no base between the two renames
    sync_folder(final.parent)
    return final


def load_base(experiment_root: Path, policy: Policy, keyring: KeyRing, unsigned_ok: bool) -> bool:
    """Start from the experiment's warmed-up base, if it has one made for this model and signed by the
    coordinator of `keyring` (an unsigned one only when `unsigned_ok`: see workers.shared_folder.base_meta)."""
    folder = ExperimentFolder(experiment_root)
    fix = f"delete {folder.base_dir} to warm up again, or use a new EXPERIMENT_NAME"
    try:
        meta = signed_base_meta(folder, keyring, unsigned_ok)
    except RejectedFile as error:
        raise RejectedFile(f"{error}; not loaded: {fix}") from None
    if meta is None:
        return False
    if meta.get("model_name") != policy.name:
        raise RejectedFile(f"{folder.base_dir} was made for MODEL_NAME={meta.get('model_name')!r}, not "
                           f"{policy.name!r}: use a new EXPERIMENT_NAME or the same MODEL_NAME")
    weights = folder.base_dir / BASE_WEIGHTS
    try:
        # never through a link, or a FIFO; loaded from the bytes whose SHA-256 was checked
        data = read_checked(weights, meta.get("files", {}).get(BASE_WEIGHTS), model_bytes(policy.model) + SLACK_BYTES)
        load_weights(policy.model, data)
    except (SafetensorError, FileNotFoundError, RuntimeError, RejectedFile) as exc:
        why = str(exc).splitlines()[0].removeprefix(f"{weights}: ")[:160]
        raise RejectedFile(f"{weights} cannot be loaded ({why}): {fix}") from exc
    if not _weights_finite(policy.model):
        # NaN weights generate garbage that earns no reward, so no group has an advantage and nothing ever
        # trains: a swarm would run every round and learn nothing, without an error anywhere
        raise RejectedFile(f"{folder.base_dir} holds weights that are not finite (a warm-up that "
                           f"diverged): delete that folder to warm up again, with a lower WARMUP_LR")
    return True


def warmup_main(cfg: SwarmConfig, model_name: str, device: str, messages) -> None:
    """Spawn target: warm up, save the base, and report steps and the result through `messages`."""
    from workers.learning.model import load_policy

    if device == "cpu":
        # one thread, as the workers: on 2 cores 100 steps of the tiny model took 8.4 s on one thread and 9.9 s
        # on two, and 110 s on two while another process kept a core busy (the threads wait on each other)
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(torch.device(device))     # no stray context on cuda:0 when DEVICE pins another GPU
    try:
        policy = load_policy(model_name, device, cfg.cache_dir)
        last = [0.0]

        def on_step(step: int, loss: float) -> None:
            now = time.monotonic()
            if now - last[0] > 0.2 or step == cfg.warmup_steps:     # a few updates a second are plenty
                messages.put(("step", (step, loss)))
                last[0] = now

        report = supervised_warmup(policy, cfg, on_step, lambda step, accuracy: messages.put(("check", accuracy)))
        # the coordinator's key, which its claim made before this process started: the base is its to sign
        key = NodeKey.load_or_create(local_key_dir(cfg.cache_dir, cfg.experiment_dir), COORDINATOR)
        path = save_base(cfg.experiment_dir, policy, report, key)
        messages.put(("done", {**asdict(report), "path": str(path), "stop_note": report.stop_note()}))
    except SwarmError as exc:       # it names the fix already; the supervisor prints it (the one copy a user sees)
        messages.put(("error", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor as one line, then the process ends
        log.exception("warm-up failed")
        messages.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]))
