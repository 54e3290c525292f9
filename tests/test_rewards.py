"""Rewards come from reasoning-gym's own scorers on the last <answer> tag; peers' numbers are never trusted."""

import random

import pytest

from workers.tasks import TaskMix, build_prompt, score_completion

CHAIN = {"question": "State the final answer to the following arithmetic problem: 3 + 4 =", "answer": "7",
         "metadata": {"source_dataset": "chain_sum"}}


@pytest.mark.parametrize("completion, reward", [
    ("<answer>7</answer>", 1.0),
    (" The sum is <answer> 7 </answer>", 1.0),
    ("<answer>8</answer>", 0.0),
    ("7", 0.0),                                          # no tag, no reward
    ("<answer>7", 0.0),                                  # unclosed tag
    ("<answer>3</answer> then <answer>7</answer>", 1.0),  # the last tag counts
    ("<answer>17</answer>", 0.5),                        # reasoning-gym's partial credit for a substring
])
def test_reward_extracts_the_last_answer_tag(completion, reward):
    assert score_completion("chain_sum", completion, CHAIN) == pytest.approx(reward)


def test_a_scorer_that_raises_scores_zero_with_a_warning(monkeypatch, caplog):
    import workers.tasks as tasks

    def broken(answer, entry):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(tasks._scorers, "chain_sum", broken)
    assert score_completion("chain_sum", "<answer>7</answer>", CHAIN) == 0.0
    assert "counted as reward 0" in caplog.text


def test_questions_are_seeded_per_node_and_scorable():
    mix = TaskMix((("chain_sum", 1.0), ("basic_arithmetic", 1.0)), seed=1)
    first = mix.sample(6, random.Random(5))
    assert first == TaskMix((("chain_sum", 1.0), ("basic_arithmetic", 1.0)), seed=1).sample(6, random.Random(5))
    assert first != TaskMix((("chain_sum", 1.0), ("basic_arithmetic", 1.0)), seed=2).sample(6, random.Random(5))
    for q in first:
        assert score_completion(q.task, f"<answer>{q.answer}</answer>", q.entry()) == 1.0
        assert build_prompt(q.question).endswith("Answer:")


def test_unknown_task_is_a_config_error():
    from configs_env import ConfigError

    with pytest.raises(ConfigError, match="TASKS names unknown reasoning-gym task"):
        TaskMix((("no_such_task", 1.0),), seed=1)
