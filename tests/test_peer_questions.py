"""A peer names its question; a worker builds it itself, scores the completions itself, and runs nothing a
peer or its own model wrote."""

import dataclasses
import inspect
import json
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from reasoning_gym.factory import DATASETS

from configs_env import ConfigError, SwarmConfig
from configs_env.presets import PAPER_TASKS
from swarm_supervisor import cli
from workers.learning.generation import encode_prompt
from workers.learning.model import load_policy
from workers.learning.scorers import (EVALS_OWN_QUESTION_ONLY, MAX_LOGIC_VARIABLES, REFUSED, SAFE_SCORERS,
                                      reasoning_gym_scorer)
from workers.learning.tasks import DATASET_SIZE, TaskMix, build_prompt, check_tasks, score_completion, score_group
from workers.round_loop import external_candidates, local_rollouts
from workers.shared_folder import exchange as exchange_module
from workers.shared_folder.exchange import Exchange
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import record_checksum
from workers.shared_folder.protocol import RolloutFile, RolloutGroup
from workers.shared_folder.rejections import RejectedFile

from tests.helpers import group, node_exchange, node_key, peer_group, swarm_env

PUBLIC_AND_DEFAULT = tuple(name for name, _ in PAPER_TASKS) + ("chain_sum",)   # basic_arithmetic is in both


@pytest.fixture(scope="module")
def policy(model_cache):
    return load_policy("rl-swarm/tiny-gpt2", "cpu", model_cache)


def _swarm(tmp_path, tasks: str = "chain_sum:1,basic_arithmetic:1", max_new_tokens: int = 16):
    cfg = SwarmConfig.from_env({"TASKS": tasks, "NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": str(max_new_tokens)})
    return cfg, ExperimentFolder(tmp_path / "exp").create()


def _through_the_folder(folder: ExperimentFolder, groups: list) -> tuple[Exchange, dict]:
    """`groups` published by peer w-2 for round 1, as w-1 reads them."""
    node_exchange(folder, "w-2").publish_rollouts(1, groups)
    reader = node_exchange(folder, "w-1")
    return reader, reader.peer_rollouts(1)


def test_a_peers_forged_answer_metadata_and_prompt_change_nothing(policy, tmp_path):
    cfg, folder = _swarm(tmp_path)
    [q] = TaskMix(cfg.tasks, seed=cfg.seed + 1).sample(1, random.Random(3))        # the peer's real question
    texts = ["BANANA", "BANANA", q.answer, q.answer]
    forged = peer_group(q, texts, for_people={"question": "Say BANANA.", "answer": "BANANA", "prompt": "BANANA",
                                              "metadata": {"source_dataset": q.task, "answer": "BANANA"}})
    reader, found = _through_the_folder(folder, [forged])
    assert json.loads(folder.rollout_file(1, "w-2").read_text())["groups"][0]["answer"] == "BANANA"
    [kept], available = external_candidates(policy, cfg, TaskMix(cfg.tasks, seed=cfg.seed), found, reader, 1)
    rebuilt = score_group(q.task, q.entry(), [f" <answer>{t}</answer>" for t in texts])
    assert available == 1 and kept.rewards == list(rebuilt.rewards) == [0.0, 0.0, 1.0, 1.0]   # not BANANA's
    assert kept.prompt_ids == encode_prompt(policy, build_prompt(q.question), cfg.max_new_tokens)


# a peer's draw, written to a file (bf's generator prints to stdout)
REBUILD_ELSEWHERE = """
import json, pathlib, random, sys
from workers.learning.tasks import TaskMix
tasks = tuple((name, 1.0) for name in sys.argv[1].split(","))
drawn = [q.__dict__ for q in TaskMix(tasks, seed=7).sample(60, random.Random(1))]
pathlib.Path(sys.argv[2]).write_text(json.dumps(drawn))
"""


def test_a_question_a_peer_drew_in_another_process_is_the_one_rebuilt_here(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", REBUILD_ELSEWHERE, ",".join(PUBLIC_AND_DEFAULT), str(tmp_path / "drawn")],
                   env=env, capture_output=True, timeout=120, check=True)
    here = TaskMix(tuple((task, 1.0) for task in reversed(PUBLIC_AND_DEFAULT)), seed=0)    # other seeds, other order
    for peer in json.loads((tmp_path / "drawn").read_text()):
        assert here.rebuild(peer["task"], peer["dataset_seed"], peer["index"]).__dict__ == peer


def test_a_group_whose_question_cannot_be_rebuilt_is_rejected_with_one_warning_naming_it(policy, tmp_path, caplog):
    cfg, folder = _swarm(tmp_path)
    [q] = TaskMix(cfg.tasks, seed=1).sample(1, random.Random(0))
    [legs] = TaskMix((("leg_counting", 1.0),), seed=1).sample(1, random.Random(0))
    answers = [q.answer, "x", q.answer, "y"]
    groups = [peer_group(legs, answers), peer_group(q, answers, dataset_seed=-1),
              peer_group(q, answers, index=DATASET_SIZE), peer_group(q, answers, dataset_seed=None, index=None),
              peer_group(q, answers)]
    reader, found = _through_the_folder(folder, groups)
    kept, available = external_candidates(policy, cfg, TaskMix(cfg.tasks, seed=0), found, reader, 1)
    assert available == len(kept) == 1
    for number, why in enumerate(["task 'leg_counting' is not in this worker's TASKS", "out of range",
                                  "out of range", "names no dataset seed and item index"]):
        assert caplog.text.count(f"round 1 rollouts of w-2, group {number}: ") == 1 and why in caplog.text
    caplog.clear()
    external_candidates(policy, cfg, TaskMix(cfg.tasks, seed=0), found, reader, 1)
    assert "rejected" not in caplog.text


def test_a_file_from_before_questions_were_named_still_reads_but_its_groups_are_refused(policy, tmp_path, caplog):
    cfg, folder = _swarm(tmp_path)
    old_group = {"task": "chain_sum", "question": "3 + 4 =", "answer": "7", "metadata": {}, "prompt": "3 + 4 =",
                 "completions": [" <answer>7</answer>", " <answer>8</answer>"] * 2, "finished": [True] * 4,
                 "rewards": [1.0, 0.0, 1.0, 0.0]}
    record = {"schema": 1, "node": "w-2", "round": 1, "stage": 0, "created_at": 0.0, "groups": [old_group]}
    assert RolloutFile.from_json(record, "old file").groups[0].dataset_seed is None        # the folder stays readable
    folder.rollout_dir(1).mkdir(parents=True)
    signed = node_key(folder, "w-2").sign(record)
    folder.rollout_file(1, "w-2").write_text(json.dumps({**signed, "sha256": record_checksum(signed)}))
    reader = node_exchange(folder, "w-1")
    assert external_candidates(policy, cfg, TaskMix(cfg.tasks, seed=0), reader.peer_rollouts(1), reader, 1) == ([], 0)
    assert "names no dataset seed and item index" in caplog.text


def gold(question) -> str:
    """The answer reasoning-gym gives full marks (propositional_logic keeps its example in the metadata)."""
    return question.metadata["example_answer"] if question.task == "propositional_logic" else question.answer


def _pwn(tmp_path, monkeypatch) -> tuple[str, Path]:
    """Code that, if anything ran it, would leave a file named PWNED in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return "__import__('os').system('touch PWNED')", tmp_path / "PWNED"


# what each task's reasoning-gym scorer evals, as a peer would aim at it: the answer, a list of rows, the metadata
@pytest.mark.parametrize("task", [*SAFE_SCORERS, *EVALS_OWN_QUESTION_ONLY])
def test_code_in_a_peers_answer_or_metadata_runs_nothing_and_scores_zero(policy, tmp_path, monkeypatch, task):
    cfg, folder = _swarm(tmp_path, f"{task}:1", max_new_tokens=128)
    code, target = _pwn(tmp_path, monkeypatch)
    [q] = TaskMix(cfg.tasks, seed=5).sample(1, random.Random(0))
    answers = [code, f"[[{code}]]", f"[{code}]", gold(q)]
    bait = {"answer": code, "metadata": {"problem": code, "valid_answers": [code], "premises": [code],
                                         "variables": ["P"], "direction": code}, "question": code, "prompt": code}
    reader, found = _through_the_folder(folder, [peer_group(q, answers, for_people=bait)])
    [kept], _ = external_candidates(policy, cfg, TaskMix(cfg.tasks, seed=cfg.seed), found, reader, 1)
    assert kept.rewards[:3] == [0.0, 0.0, 0.0] and kept.rewards[3] > 0
    assert score_completion(task, f"<answer>{code}</answer>", q.entry()) == 0.0      # our own model's text too
    assert not target.exists()


def test_reasoning_gym_s_own_binary_matrix_scorer_would_have_run_it(tmp_path, monkeypatch):
    """What the safe scorer stands between: the same answer through reasoning-gym's scorer creates the file."""
    code, target = _pwn(tmp_path, monkeypatch)
    [q] = TaskMix((("binary_matrix", 1.0),), seed=5).sample(1, random.Random(0))
    reasoning_gym_scorer("binary_matrix")(code, q.entry())
    assert target.exists()


def _honest_answers(question) -> list[str]:
    """Gold answers and the near misses a model writes: other shapes, one cell off, half-written, empty."""
    answer, meta = gold(question), question.metadata
    if question.task in ("binary_matrix", "n_queens"):
        rows = [row.split(" ") for row in answer.split("\n")]
        cells = rows if question.task == "n_queens" else [[int(c) for c in row] for row in rows]
        off = [list(row) for row in cells]
        off[0][0] = {"Q": "_", "_": "Q"}[off[0][0]] if question.task == "n_queens" else off[0][0] + 1
        more = [str(cells), json.dumps(cells), str(off), str(cells)[:-1], str([[str(c) for c in r] for r in rows]),
                "\n".join(" ".join(str(c) for c in row) for row in off)]
        more += meta.get("valid_answers", [])[:2]
    elif question.task == "spiral_matrix":
        items = [int(x) for x in answer.split()]
        more = [str(items), str(items[::-1]), str(tuple(items)), str([str(x) for x in items]), f" {answer} ",
                " ".join(str(x) for x in items[::-1]), str(items)[:-1]]
    elif question.task == "string_insertion":
        more = [str(list(answer)), json.dumps(list(answer)), repr(answer), str(list(answer[:-1])), answer[:-1],
                answer + "A", str(list(answer))[:-1]]
    else:                                                                # propositional_logic
        premise = meta["premises"][0]
        more = [f"¬({answer})", premise, f"{premise} ∧ {answer}", "P ∨ ¬P", "P ∧ Q", "P ∨ a", "(P", "Z", "P →",
                answer.replace("P", "Q"), f"({answer}) ∨ x ∨ y"]
    return [answer, *more, "", "the answer", "[]", "None", "1"]


@pytest.mark.parametrize("task", list(SAFE_SCORERS))
def test_safe_scorers_give_reasoning_gym_s_score_on_honest_answers(task):
    questions = TaskMix(((task, 1.0),), seed=11).sample(200, random.Random(0))
    ours, theirs = SAFE_SCORERS[task], reasoning_gym_scorer(task)
    scores = []
    for q in questions:
        for answer in _honest_answers(q):
            assert ours(answer, q.entry()) == theirs(answer, q.entry()), (q.index, answer)
            scores.append(ours(answer, q.entry()))
    assert len(set(scores)) >= 3            # full marks, partial credit (the literal-reading path) and nothing


def test_a_logic_answer_with_too_many_names_scores_zero_instead_of_a_huge_truth_table():
    [q] = TaskMix((("propositional_logic", 1.0),), seed=11).sample(1, random.Random(0))
    names = " ∨ ".join(f"a{i}" for i in range(MAX_LOGIC_VARIABLES))      # with P..: past the bound
    assert score_completion(q.task, f"<answer>{gold(q)} ∨ {names}</answer>", q.entry()) == 0.0
    assert score_completion(q.task, f"<answer>{gold(q)} ∨ a1</answer>", q.entry()) > 0.0   # a few extra names: scored


@pytest.mark.parametrize("task", sorted(REFUSED))
def test_a_task_whose_scorer_would_run_the_answer_is_refused_in_one_line(task):
    with pytest.raises(ConfigError) as refused:
        TaskMix(SwarmConfig.from_env({"TASKS": f"chain_sum:1,{task}:1"}).tasks, seed=0)
    message = str(refused.value)
    assert "\n" not in message and f"TASKS names {task}:" in message and "parse_expr" in message


def test_rl_swarm_up_with_a_refused_task_stops_in_one_line_before_anything_starts(tmp_path, monkeypatch, capsys):
    for name, value in swarm_env(tmp_path, TASKS="chain_sum:1,countdown:1").items():
        monkeypatch.setenv(name, value)
    assert cli.main(["up"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("rl-swarm: error: TASKS names countdown: ") and "remove it from TASKS" in line
    assert not (tmp_path / "drive").exists()


def _evaluates_text(task: str) -> bool:
    """Whether a task's scorer, or a helper it calls, reaches eval/exec or sympy's parser."""
    cls = DATASETS[task][0]
    source = inspect.getsource(cls.score_answer)
    module = inspect.getmodule(cls)
    for name in set(re.findall(r"self\.(_\w+)\(", source)):
        source += inspect.getsource(getattr(cls, name)) if callable(getattr(cls, name, None)) else ""
    for name in set(re.findall(r"(?<![.\w])([a-z_]\w*)\(", source)):
        helper = getattr(module, name, None)
        if inspect.isfunction(helper) and helper.__module__.startswith("reasoning_gym"):
            source += inspect.getsource(helper)
    return re.search(r"\beval\(|\bexec\(|parse_expr|sympify", source) is not None


def test_every_reasoning_gym_scorer_that_evaluates_text_is_replaced_refused_or_sees_only_our_question():
    evaluating = {task for task in DATASETS if task != "composite" and _evaluates_text(task)}
    assert "binary_matrix" in evaluating                     # the check finds what it is meant to find
    assert evaluating <= set(SAFE_SCORERS) | set(REFUSED) | set(EVALS_OWN_QUESTION_ONLY), \
        "a reasoning-gym scorer evaluates text: give it a safe scorer or refuse the task in workers/learning/scorers.py"


def test_the_public_swarm_s_nine_tasks_and_the_defaults_are_playable_and_score_their_gold():
    mix = TaskMix(tuple((task, 1.0) for task in PUBLIC_AND_DEFAULT), seed=3)
    check_tasks(SwarmConfig.from_env({}).tasks)
    for q in mix.sample(200, random.Random(0)):
        score = score_completion(q.task, f"<answer>{gold(q)}</answer>", q.entry())
        # reasoning-gym's example conclusion is sometimes trivial (0.25) or, falling back, not one at all (0.05)
        assert score > 0 if q.task == "propositional_logic" else score == 1.0, q


def _filler_to(policy, tail: str, tokens: int) -> str:
    """`tail` after enough filler that the text is `tokens` tokens long."""
    for count in range(tokens + 1):
        text = " 1" * count + tail
        if len(policy.tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens:
            return text
    raise AssertionError(f"no filler makes {tail!r} {tokens} tokens long")


def test_a_peer_completion_longer_than_max_new_tokens_is_rejected_not_cut(policy, tmp_path, caplog):
    cfg, folder = _swarm(tmp_path, max_new_tokens=16)
    [q] = TaskMix(cfg.tasks, seed=1).sample(1, random.Random(0))
    fits = _filler_to(policy, f" <answer>{q.answer}</answer>", 15)            # + EOS: 16 tokens
    too_long = _filler_to(policy, f" <answer>{q.answer}</answer>", 16)        # + EOS: 17
    wrong = " <answer>x</answer>"
    groups = [peer_group(q, [], completions=(fits, wrong, wrong, wrong), finished=(True,) * 4, rewards=(0.0,) * 4),
              peer_group(q, [], completions=(too_long, wrong, wrong, wrong), finished=(True,) * 4,
                         rewards=(0.0,) * 4),
              peer_group(q, [q.answer, "x", "y"])]                          # G=3 where G=4: stays rejected
    reader, found = _through_the_folder(folder, groups)
    kept, available = external_candidates(policy, cfg, TaskMix(cfg.tasks, seed=0), found, reader, 1)
    assert available == 1 and kept[0].rewards == [1.0, 0.0, 0.0, 0.0] and len(kept[0].completion_ids[0]) == 16
    assert "group 1: a completion of 17 tokens, over MAX_NEW_TOKENS=16" in caplog.text
    assert "group 2: 3 completions, expected G=4" in caplog.text


@pytest.mark.parametrize("ids", [[5, True], [5, -1], [5, 2**20], [5, 5.0], [5, "5"], [5, None], [[5]]],
                         ids=["a bool", "negative", "beyond any vocabulary", "a float", "a string", "null", "a list"])
def test_a_peers_token_ids_that_are_not_token_ids_are_refused(ids):
    """A peer's completion_ids are trained on: anything but an int id in range refuses its group."""
    record = {**group(2).to_json(), "completion_ids": [[7, 8], ids]}
    with pytest.raises(RejectedFile, match="completion_ids"):
        RolloutGroup.from_json(record, "rollouts/round_1/w-2.json group 0")
    assert RolloutGroup.from_json({**record, "completion_ids": [[7, 8], [5, 2**20 - 1]]}, "g").completion_ids[1] \
        == (5, 2**20 - 1)


def test_a_raw_models_full_length_completions_are_trained_on_as_sampled_and_forged_ids_are_refused(
        policy, tmp_path, caplog):
    """A raw model's text often tokenises into more ids than it sampled: the sampled ids travel with the text."""
    cfg = SwarmConfig.from_env({"NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": "32", "NUM_TRAIN_SAMPLES": "8"})
    folder = ExperimentFolder(tmp_path / "exp").create()
    questions = TaskMix(cfg.tasks, seed=1).sample(8, random.Random(0))
    shared, training = local_rollouts(policy, cfg, questions, seed=5)      # the raw tiny model: no warm-up
    retokenised = [len(policy.tokenizer(t, add_special_tokens=False)["input_ids"]) + f
                   for g in shared for t, f in zip(g.completions, g.finished)]
    assert max(retokenised) > 32, "no completion tokenised longer than sampled: the case is not exercised"
    forged = shared[0].completion_ids[0][:-1] + (shared[0].completion_ids[0][0],)    # another text, same length
    beyond = (len(policy.tokenizer), *shared[1].completion_ids[0][1:])      # an id of no token
    groups = [*shared, dataclasses.replace(shared[0], completion_ids=(forged, *shared[0].completion_ids[1:])),
              dataclasses.replace(shared[1], completion_ids=(beyond, *shared[1].completion_ids[1:]))]
    reader, found = _through_the_folder(folder, groups)
    kept, available = external_candidates(policy, cfg, TaskMix(cfg.tasks, seed=0), found, reader, 1)
    assert available == 8                                                   # every honest group, none cut
    assert all(c in [list(ids) for g in training for ids in g.completion_ids] for k in kept
               for c in k.completion_ids)                                   # trained on the ids it sampled
    assert "group 8: its token ids do not spell its completion" in caplog.text
    assert "group 9: its token ids do not spell its completion" in caplog.text


def test_a_reader_remembers_only_the_newest_records_over_many_rounds(tmp_path, monkeypatch):
    monkeypatch.setattr(exchange_module, "MAX_REMEMBERED", 6)
    folder = ExperimentFolder(tmp_path / "exp").create()
    [q] = TaskMix((("chain_sum", 1.0),), seed=1).sample(1, random.Random(0))
    writers = [node_exchange(folder, f"w-{n}") for n in (2, 3)]
    reader = node_exchange(folder, "w-1")
    for round_ in range(1, 41):
        for writer in writers:
            writer.publish_rollouts(round_, [peer_group(q, ["1", "2"])])
        folder.rollout_file(round_, "w-9").write_text("{not json")                # a bad file every round
        found = reader.wait_for_peers(round_, {"w-2", "w-3"}, timeout_s=5, stop=threading.Event())
        assert sorted(found) == ["w-2", "w-3"]
        assert len(reader._cache) <= 6 and len(reader._bad) <= 6
    assert reader.peer_rollouts(40) == found                                         # this round's, still read
    assert reader.rejected == 40                                                 # each bad file counted once
