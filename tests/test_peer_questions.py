"""A peer names its question; a worker builds it itself and scores the completions on it itself."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs_env import SwarmConfig
from configs_env.presets import PAPER_TASKS
from workers.learning.generation import encode_prompt
from workers.learning.model import load_policy
from workers.learning.tasks import DATASET_SIZE, TaskMix, build_prompt, score_group
from workers.round_loop import external_candidates
from workers.shared_folder.exchange import Exchange
from workers.shared_folder.folder import ExperimentFolder, record_checksum
from workers.shared_folder.protocol import RolloutFile

from tests.helpers import peer_group

PUBLIC_AND_DEFAULT = tuple(name for name, _ in PAPER_TASKS) + ("chain_sum",)   # basic_arithmetic is in both


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    torch.set_num_threads(2)
    return load_policy("rl-swarm/tiny-gpt2", "cpu", tmp_path_factory.mktemp("cache"))


def _swarm(tmp_path, tasks: str = "chain_sum:1,basic_arithmetic:1", max_new_tokens: int = 16):
    cfg = SwarmConfig.from_env({"TASKS": tasks, "NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": str(max_new_tokens)})
    return cfg, ExperimentFolder(tmp_path / "exp").create()


def _through_the_folder(folder: ExperimentFolder, groups: list) -> tuple[Exchange, dict]:
    """`groups` published by peer w-2 for round 1, as w-1 reads them."""
    Exchange(folder, "w-2").publish_rollouts(1, 0, groups)
    reader = Exchange(folder, "w-1")
    return reader, reader.peer_rollouts(1)


def test_a_peers_forged_answer_metadata_and_prompt_change_nothing(policy, tmp_path):
    cfg, folder = _swarm(tmp_path)
    [q] = TaskMix(cfg.tasks, seed=cfg.seed + 1).sample(1, random.Random(3))        # the peer's real question
    texts = ["BANANA", "BANANA", q.answer, q.answer]
    forged = peer_group(q, texts, for_people={"question": "Say BANANA.", "answer": "BANANA", "prompt": "BANANA",
                                              "metadata": {"source_dataset": q.task, "answer": "BANANA"}})
    reader, found = _through_the_folder(folder, [forged])
    assert json.loads(folder.rollout_file(1, 0, "w-2").read_text())["groups"][0]["answer"] == "BANANA"
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
    folder.rollout_dir(1, 0).mkdir(parents=True)
    folder.rollout_file(1, 0, "w-2").write_text(json.dumps({**record, "sha256": record_checksum(record)}))
    reader = Exchange(folder, "w-1")
    assert external_candidates(policy, cfg, TaskMix(cfg.tasks, seed=0), reader.peer_rollouts(1), reader, 1) == ([], 0)
    assert "names no dataset seed and item index" in caplog.text
