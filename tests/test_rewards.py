"""Rewards come from reasoning-gym's own scorers on the one <answer> tag that ends a completion."""

import random

import pytest

from workers.learning.tasks import TaskMix, build_prompt, score_completion

CHAIN = {"question": "State the final answer to the following arithmetic problem: 3 + 4 =", "answer": "7",
         "metadata": {"source_dataset": "chain_sum"}}


@pytest.mark.parametrize("completion, reward", [
    ("<answer>7</answer>", 1.0),
    (" The sum is <answer> 7 </answer>", 1.0),
    ("<answer>8</answer>", 0.0),
    ("7", 0.0),                                          # no tag, no reward
    ("<answer>7", 0.0),                                  # unclosed tag
    ("3 plus 4 makes 7, so <answer>7</answer>\n", 1.0),  # reasoning before the tag, whitespace after it
    ("<answer>3</answer> then <answer>7</answer>", 0.0),  # a second draw at the answer earns nothing
    ("<answer>7</answer>14</answer>", 0.0),              # going on after the answer earns nothing
    ("<answer>7</answer> and more", 0.0),
    ("<answer><answer>7</answer>", 0.0),
    ("<answer>17</answer>", 0.5),                        # reasoning-gym's partial credit for a substring
])
def test_reward_scores_the_one_answer_tag_that_ends_the_completion(completion, reward):
    assert score_completion("chain_sum", completion, CHAIN) == pytest.approx(reward)


def test_a_scorer_that_raises_scores_zero_with_a_warning(monkeypatch, caplog):
    import workers.learning.tasks as tasks

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


def test_format_reward_adds_exactly_its_bonus_to_a_tagged_answer_and_never_to_accuracy():
    from workers.learning.tasks import score_group

    completions = ["<answer>8</answer>", "7", "<answer></answer>", "<answer>7</answer>"]
    scores = score_group("chain_sum", CHAIN, completions, format_reward=0.1)
    assert scores.rewards == pytest.approx((0.1, 0.0, 0.0, 1.1))   # wrong but well formed; untagged; empty; right
    assert scores.correctness == (0.0, 0.0, 0.0, 1.0)              # what exact-match accuracy counts
    assert scores.well_formed == (True, False, False, True)
    assert score_group("chain_sum", CHAIN, completions).rewards == scores.correctness   # off by default


def test_rewards_above_one_still_give_zero_mean_advantages():
    import torch

    from workers.learning.grpo import group_advantages

    advantages = group_advantages(torch.tensor([[1.1, 0.1, 0.0, 1.1], [1.1, 1.1, 1.1, 1.1]]))
    assert advantages[0].sum().abs() < 1e-5 and advantages[0, 0] > advantages[0, 1] > advantages[0, 2]
    assert torch.equal(advantages[1], torch.zeros(4))              # all right and well formed: no signal


def test_building_questions_prints_nothing_on_the_terminal(capfd):
    # reasoning-gym's bf generator prints a dot per optimiser pass: on a worker's stdout that would draw over
    # the dashboard
    questions = TaskMix((("bf", 1.0),), seed=3).sample(5, random.Random(0))
    assert len(questions) == 5 and all(q.answer for q in questions)
    assert capfd.readouterr().out == ""
