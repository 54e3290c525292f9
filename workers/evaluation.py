"""Held-out evaluation: greedy exact-match on a fixed question set that no worker trains on.

A round's training reward comes from a few fresh questions sampled at temperature 1, too noisy to tell
whether a worker learns. The held-out set is drawn from EVAL_SEED alone, so every node answers the same
questions whatever its SEED and index, and the numbers of nodes and of experiments compare.
"""

import random
import time
from dataclasses import dataclass

from configs_env import SwarmConfig
from workers.learning.generation import prompts_per_call, sample_completions
from workers.learning.model import Policy
from workers.shared_folder.protocol import HeldOutEval
from workers.learning.tasks import Question, TaskMix, build_prompt, score_completion

# Item i of a reasoning-gym dataset of seed s is built from Random(s + i), i < 1e6 (tasks.DATASET_SIZE). Worker
# `index` trains on seeds (SEED + index) * 1009 + task, the warm-up on (SEED + 7919) * 1009 + task; this set's
# items start at EVAL_SEED * 1009 (~996.5e6), so no training draw is one of them unless SEED + index or
# SEED + 7919 lies within ~1,000 of 987,654. (Tiny tasks repeat question texts across seeds all the same.)
EVAL_SEED = 987_654
EVAL_BATCH = 32            # prompts per generate call: bounds the KV cache like a round's I x G rows do


def held_out_questions(tasks: tuple[tuple[str, float], ...], size: int) -> list[Question]:
    """The same `size` questions for every node: they depend on TASKS and EVAL_SEED, not on SEED or the index."""
    if size <= 0:
        return []
    return TaskMix(tasks, seed=EVAL_SEED).sample(size, random.Random(EVAL_SEED))


@dataclass(frozen=True)
class GreedyAnswer:
    hit: bool               # exactly right (score == 1)
    tokens: int             # its completion tokens, EOS included when it ended
    finished: bool          # ended before MAX_NEW_TOKENS


def greedy_accuracy(policy: Policy, questions: list[Question], max_new_tokens: int, fast: bool = False,
                    batch_size: int | None = None) -> float:
    """Exact-match rate (score == 1) of greedy answers, `batch_size` prompts a generate call (default: all)."""
    hits = greedy_hits(policy, questions, max_new_tokens, fast, batch_size)
    return sum(hits) / max(1, len(hits))


def accuracy_by_task(questions: list[Question], hits: list[bool]) -> dict[str, float]:
    """Exact-match rate per task, in the order the tasks first appear."""
    counts: dict[str, list[int]] = {}
    for question, hit in zip(questions, hits):
        count = counts.setdefault(question.task, [0, 0])
        count[0] += hit
        count[1] += 1
    return {task: right / total for task, (right, total) in counts.items()}


def greedy_hits(policy: Policy, questions: list[Question], max_new_tokens: int, fast: bool = False,
                batch_size: int | None = None) -> list[bool]:
    """Whether each greedy answer is exactly right (score == 1), `batch_size` prompts a generate call."""
    return [answer.hit for answer in greedy_answers(policy, questions, max_new_tokens, fast, batch_size)]


def greedy_answers(policy: Policy, questions: list[Question], max_new_tokens: int, fast: bool = False,
                   batch_size: int | None = None) -> list[GreedyAnswer]:
    """Each question's greedy answer, scored, `batch_size` prompts a generate call."""
    prompts = [build_prompt(q.question) for q in questions]
    size = max(1, batch_size or len(prompts))
    answers = []
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        if fast and policy.device.type == "cuda":
            # the fast sampler captures a CUDA graph per batch shape: a short last batch repeats a prompt
            # instead of capturing (and keeping) one more graph
            batch = batch + batch[-1:] * (size - len(batch))
        groups = sample_completions(policy, batch, 1, max_new_tokens, 1.0, generator_seed=0, greedy=True, fast=fast)
        for question, [completion] in zip(questions[start:start + size], groups):
            answers.append(GreedyAnswer(score_completion(question.task, completion.text, question.entry()) >= 1.0,
                                        len(completion.ids), completion.finished))
    return answers


def eval_due(round_: int, max_rounds: int, every: int) -> bool:
    """Before round 1 (round 0), every `every` rounds (0: never in between), and after the last round."""
    return round_ == 0 or round_ >= max_rounds or (every > 0 and round_ % every == 0)


def evaluate_held_out(policy: Policy, cfg: SwarmConfig, questions: list[Question], node: str, round_: int,
                      splits: int = 1) -> HeldOutEval:
    """Greedy answers of MAX_NEW_TOKENS; on CUDA through the workers' fast sampler (workers.learning.decode)."""
    started = time.monotonic()
    on_cuda = policy.device.type == "cuda"
    # on CUDA as many prompts a call as a round generates rows: the sampler's KV cache, sized by the
    # round, is reused as it is instead of growing for the evaluation and staying grown
    size = (prompts_per_call(cfg.num_train_samples, splits) * cfg.num_generations if on_cuda
            else EVAL_BATCH // max(1, splits))
    answers = greedy_answers(policy, questions, cfg.max_new_tokens, fast=True, batch_size=max(1, size))
    count = max(1, len(answers))
    return HeldOutEval(node=node, round=round_, accuracy=sum(a.hit for a in answers) / count,
                       questions=len(questions), seconds=time.monotonic() - started,
                       mean_tokens=sum(a.tokens for a in answers) / count,
                       cut_off=sum(not a.finished for a in answers))
