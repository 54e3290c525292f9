"""Questions from reasoning-gym, prompts, answer extraction and scoring."""

import contextlib
import functools
import io
import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import reasoning_gym
from reasoning_gym.dataset import ProceduralDataset
from reasoning_gym.factory import DATASETS

from configs_env import ConfigError
from workers.learning.scorers import REFUSED, Scorer, scorer_for

log = logging.getLogger(__name__)

# Difficulty that GPT-2-sized models can partly solve after a warm-up: one-digit operands, two terms.
# Tasks not listed here use reasoning-gym's own defaults.
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                         "operators": ("+", "-"), "allow_parentheses": False, "allow_negation": False},
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "leg_counting": {"min_animals": 1, "max_animals": 2, "max_instances": 2},
}
DATASET_SIZE = 1_000_000   # reasoning-gym builds item i from (seed, i) on demand, so a large size costs nothing
# datasets built for peers' questions, by (task, seed): a swarm of 8 workers on 9 tasks uses 72
REBUILT_DATASETS = 256


class QuestionNotRebuilt(ValueError):
    """A peer named a question this worker cannot build itself; the message says why."""


@dataclass(frozen=True)
class Question:
    task: str
    question: str
    answer: str
    metadata: dict[str, Any]
    dataset_seed: int     # with task and index, all reasoning-gym needs to build this question again
    index: int

    def entry(self) -> dict[str, Any]:
        """The dict reasoning-gym's scorers expect."""
        return {"question": self.question, "answer": self.answer, "metadata": self.metadata}


def build_prompt(question: str) -> str:
    # Prompt and completion are tokenised separately and concatenated (BPE merges across the
    # boundary would otherwise differ between training and generation).
    return f"{question}\nAnswer:"


def check_tasks(tasks: tuple[tuple[str, float], ...]) -> None:
    unknown = [name for name, _ in tasks if name not in DATASETS or name == "composite"]
    if unknown:
        raise ConfigError(f"TASKS names unknown reasoning-gym task(s) {', '.join(unknown)}: "
                          f"use names such as chain_sum, basic_arithmetic, leg_counting")
    refused = sorted({name for name, _ in tasks if name in REFUSED})
    if refused:
        why = "; ".join(sorted({REFUSED[name] for name in refused}))
        raise ConfigError(f"TASKS names {', '.join(refused)}: {why}; remove it from TASKS "
                          "(e.g. TASKS=chain_sum:1,basic_arithmetic:1)")


@functools.lru_cache(maxsize=REBUILT_DATASETS)
def task_dataset(task: str, seed: int) -> ProceduralDataset:
    """Dataset `seed` of a task, with this project's TASK_SETTINGS: a peer's questions are built from the same."""
    return reasoning_gym.create_dataset(task, size=DATASET_SIZE, seed=seed, **TASK_SETTINGS.get(task, {}))


def _question(task: str, dataset_seed: int, index: int) -> Question:
    # some generators print as they build (bf's optimiser prints a dot a pass): in a worker that is noise on the
    # terminal the dashboard draws on, and a thousand dots in the warm-up's log
    with contextlib.redirect_stdout(io.StringIO()):
        item = task_dataset(task, dataset_seed)[index]
    metadata = dict(item.get("metadata", {}))
    metadata["source_dataset"] = task
    return Question(task=task, question=item["question"], answer=str(item["answer"]), metadata=_json_safe(metadata),
                    dataset_seed=dataset_seed, index=index)


class TaskMix:
    """A weighted mix of reasoning-gym tasks; questions are drawn with the caller's seeded RNG."""

    def __init__(self, tasks: tuple[tuple[str, float], ...], seed: int):
        check_tasks(tasks)
        self.names = [name for name, _ in tasks]
        self.weights = [weight for _, weight in tasks]
        # the seed depends on the task's place in TASKS and the node: a published question names it
        self.seeds = {name: seed * 1009 + index for index, name in enumerate(self.names)}
        self.datasets = {}
        for name in self.names:
            try:
                self.datasets[name] = task_dataset(name, self.seeds[name])
            except (TypeError, ValueError, AssertionError) as exc:
                raise ConfigError(f"TASKS: reasoning-gym task {name!r} could not be built ({exc}); "
                                  "choose another task") from exc

    def sample(self, count: int, rng: random.Random) -> list[Question]:
        return [_question(name, self.seeds[name], rng.randrange(DATASET_SIZE))
                for name in rng.choices(self.names, weights=self.weights, k=count)]

    def rebuild(self, task: str, dataset_seed: int | None, index: int | None) -> Question:
        """A peer's question, built here from what it names: its answer, metadata and prompt are never a peer's."""
        if task not in self.datasets:
            raise QuestionNotRebuilt(f"task {task!r} is not in this worker's TASKS")
        if dataset_seed is None or index is None:
            raise QuestionNotRebuilt("it names no dataset seed and item index (an older rl-swarm wrote it), so its "
                                     "question cannot be rebuilt")
        if dataset_seed < 0 or not 0 <= index < DATASET_SIZE:
            raise QuestionNotRebuilt(f"dataset seed {dataset_seed} or item index {index} is out of range (seed >= 0, "
                                     f"index 0..{DATASET_SIZE - 1})")
        try:
            return _question(task, dataset_seed, index)
        except Exception as exc:  # noqa: BLE001 - reasoning-gym's generators raise anything on an odd seed
            raise QuestionNotRebuilt(f"reasoning-gym could not build item {index} of {task} with seed "
                                     f"{dataset_seed} ({type(exc).__name__})") from exc


def _json_safe(value: Any) -> Any:
    """reasoning-gym metadata holds tuples; make it what a JSON round trip gives, so local and peer scoring agree."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


_scorers: dict[str, Scorer] = {}
# the completion's one answer tag, at its end: free text (reasoning) may come before it, nothing after it
_FINAL_ANSWER = re.compile(r"<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL)


def final_answer(completion: str) -> str | None:
    """The answer of a completion that ends with its one `<answer>...</answer>`; None for any other shape.

    reasoning-gym's own extract_answer takes the last of any number of tags, and RL learns to exploit
    that: a wrong answer followed by more tags gets another draw at the right one, so completions stop
    ending and grow to MAX_NEW_TOKENS (measured: 9 -> 180 tokens in 90 rounds of the tiny model). One
    tag, closing the completion, leaves nothing to gain from going on.
    """
    if completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return None
    match = _FINAL_ANSWER.search(completion)
    return match["answer"].strip() if match else None


def score_completion(task: str, completion: str, entry: dict[str, Any]) -> float:
    """Correctness in [0, 1] from reasoning-gym's scorer (or ours, where its would evaluate the answer) on
    final_answer(completion); a scorer that raises: 0."""
    if task not in DATASETS:
        raise KeyError(task)
    scorer = _scorers.get(task)
    if scorer is None:
        scorer = _scorers[task] = scorer_for(task)
    answer = final_answer(completion)
    if answer is None:
        return 0.0
    try:
        reward = float(scorer(answer, entry))
    except Exception as exc:  # noqa: BLE001 - third-party scorers raise anything on odd answers
        log.warning("scorer of %s raised %s on answer %r; counted as reward 0", task, type(exc).__name__, answer[:80])
        return 0.0
    return min(1.0, max(0.0, reward)) if reward == reward else 0.0


def well_formed(completion: str) -> bool:
    """One closing <answer>...</answer> around a non-empty answer (an empty tag would earn FORMAT_REWARD for free)."""
    answer = final_answer(completion)
    return answer is not None and answer != ""


@dataclass(frozen=True)
class GroupScores:
    """One group's scores; local and peers' groups go through the same rule, so their rewards agree."""

    correctness: tuple[float, ...]    # reasoning-gym's score in [0, 1]; exact-match accuracy counts the 1.0s
    well_formed: tuple[bool, ...]
    rewards: tuple[float, ...]        # what GRPO trains on: correctness + FORMAT_REWARD if well formed (may pass 1)


def score_group(task: str, entry: dict[str, Any], completions: list[str], format_reward: float = 0.0) -> GroupScores:
    correctness = tuple(score_completion(task, text, entry) for text in completions)
    formed = tuple(well_formed(text) for text in completions)
    return GroupScores(correctness=correctness, well_formed=formed,
                       rewards=tuple(c + (format_reward if f else 0.0) for c, f in zip(correctness, formed)))
