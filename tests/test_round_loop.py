"""A round with the tiny model: peers' groups re-scored, every metric the issue asks for, the held-out evaluation."""

import copy
import json
from math import nan
import random
import threading

import pytest
import torch

from configs_env import SwarmConfig
from workers.evaluation import EVAL_SEED, eval_due, evaluate_held_out, greedy_accuracy, held_out_questions
from workers.shared_folder.folder import ExperimentFolder
from workers.learning.model import Policy, load_policy
from workers.shared_folder.protocol import HeldOutEval, RoundMetrics
from workers.round_loop import Node, external_candidates, play_round, round_seed
from workers.learning.tasks import TaskMix
from workers.warmup import supervised_warmup

from tests.helpers import peer_group
from tests.helpers import node_exchange


@pytest.fixture(scope="module")
def policy(model_cache):
    return load_policy("rl-swarm/tiny-gpt2", "cpu", model_cache)


@pytest.fixture(scope="module")
def warmed(policy):
    """The tiny model after a short warm-up: it writes <answer> tags some of the time, so FORMAT_REWARD has signal."""
    torch.manual_seed(0)
    student = Policy(copy.deepcopy(policy.model), policy.tokenizer, policy.name, policy.device)
    supervised_warmup(student, SwarmConfig.from_env({"WARMUP_STEPS": "100", "WARMUP_BATCH_SIZE": "16",
                                                     "MAX_NEW_TOKENS": "16"}))
    return student


def test_peers_groups_are_rescored_ragged_and_unknown_ones_rejected(policy, tmp_path, caplog):
    cfg = SwarmConfig.from_env({"NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": "16"})
    tasks = TaskMix(cfg.tasks, seed=0)
    exchange = node_exchange(ExperimentFolder(tmp_path).create(), "w-1")
    [q] = TaskMix((("chain_sum", 1.0),), seed=5).sample(1, random.Random(0))        # a peer's own question
    [legs] = TaskMix((("leg_counting", 1.0),), seed=5).sample(1, random.Random(0))
    peers = {
        "w-2": [peer_group(q, [q.answer, "x", q.answer, "y"]),              # signal: kept, re-scored here
                peer_group(q, [q.answer, "x", "y"]),                        # G=3 while we use G=4: rejected
                peer_group(q, ["x"] * 4, claimed=1.0)],                     # claims 1.0, really all 0: no signal
        "w-3": [peer_group(legs, [legs.answer, "8", "7", "1"])],           # a task not in our TASKS: rejected
    }
    kept, available = external_candidates(policy, cfg, tasks, peers, exchange, round_=1)
    assert available == 2
    assert len(kept) == 1 and kept[0].rewards == [1.0, 0.0, 1.0, 0.0]
    assert all(ids[-1] == policy.tokenizer.eos_token_id for ids in kept[0].completion_ids)
    assert "3 completions, expected G=4" in caplog.text
    assert "task 'leg_counting' is not in this worker's TASKS" in caplog.text
    caplog.clear()
    external_candidates(policy, cfg, tasks, peers, exchange, round_=1)
    assert "rejected" not in caplog.text                                  # one warning per bad group, not per look


def test_a_round_records_reward_spread_format_rate_update_stats_and_stage_times(policy, warmed, tmp_path):
    cfg = SwarmConfig.from_env({"NUM_WORKERS": "1", "NUM_TRAIN_SAMPLES": "4", "NUM_TRANSPLANT_TREES": "0",
                                "NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": "16", "FORMAT_REWARD": "0.1",
                                "KL_BETA": "0.05"})
    learner = Policy(copy.deepcopy(warmed.model), warmed.tokenizer, warmed.name, warmed.device)
    optimizer = torch.optim.AdamW(learner.model.parameters(), lr=1e-4)
    exchange = node_exchange(ExperimentFolder(tmp_path).create(), "w-1")
    # the KL anchor is the model the worker started from: here the raw tiny model, before its warm-up
    node = Node(learner, optimizer, cfg, TaskMix(cfg.tasks, seed=cfg.seed), exchange, 0, reference=policy.model)
    metrics = play_round(node, 1, threading.Event(), lambda: set(), lambda stage: None)
    row = RoundMetrics.from_json(json.loads(json.dumps(metrics.to_json())))     # the metrics.jsonl line
    assert row == metrics
    assert row.completions == 16 and row.local_groups == 4 and row.external_groups == 0
    assert row.external_zero_advantage_groups == 0                            # J=0: no peer group looked at
    assert 0 < row.format_rate <= 1 and row.accuracy <= row.format_rate       # an exact match needs a tag
    assert row.reward_max >= row.reward_mean > 0 and row.reward_std > 0
    assert row.zero_advantage_groups < row.local_groups                       # the format bonus gave signal
    assert row.grad_norm > 0 and 0 <= row.clip_fraction <= 1 and row.kl > 0 and row.learning_rate == 1e-4
    assert row.max_completion_tokens >= row.mean_completion_tokens > 0
    assert min(row.generate_s, row.score_s, row.fetch_s, row.train_s) >= 0
    assert row.round_s == pytest.approx(row.generate_s + row.score_s + row.fetch_s + row.train_s)


def test_a_round_whose_update_is_not_finite_keeps_the_model_and_records_the_skip(warmed, tmp_path, monkeypatch):
    """Seen on the GPU (paper preset): a NaN in one update crashed the worker when it wrote its metrics, and
    again after every restart. Now the step is skipped and the round is recorded."""
    cfg = SwarmConfig.from_env({"NUM_WORKERS": "1", "NUM_TRAIN_SAMPLES": "4", "NUM_TRANSPLANT_TREES": "0",
                                "NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": "16", "FORMAT_REWARD": "0.1"})
    learner = Policy(copy.deepcopy(warmed.model), warmed.tokenizer, warmed.name, warmed.device)
    weights = [p.detach().clone() for p in learner.model.parameters()]
    node = Node(learner, torch.optim.AdamW(learner.model.parameters(), lr=1e-4), cfg,
                TaskMix(cfg.tasks, seed=cfg.seed), node_exchange(ExperimentFolder(tmp_path).create(), "w-1"), 0)
    monkeypatch.setattr("workers.round_loop.group_advantages", lambda rewards, scale: torch.full_like(rewards, nan))
    metrics = play_round(node, 1, threading.Event(), lambda: set(), lambda stage: None)
    line = json.dumps(metrics.to_json(), allow_nan=False)                     # what append_jsonl writes
    row = RoundMetrics.from_json(json.loads(line))
    assert row.skipped_steps == 1 and row.loss is None and row.grad_norm is None
    assert row.local_groups == 4 and row.completions == 16
    assert all(torch.equal(a, b) for a, b in zip(weights, learner.model.parameters()))


def test_a_metrics_line_from_before_the_new_fields_still_parses():
    old = {"schema": 1, "node": "w-1", "round": 7, "reward_mean": 0.5, "accuracy": 0.25, "loss": 0.1,
           "local_groups": 2, "external_groups": 2, "external_available": 6, "zero_advantage_groups": 1,
           "completions": 8, "mean_completion_tokens": 9.5, "generate_s": 1.0, "fetch_s": 0.2, "train_s": 0.3,
           "round_s": 1.5, "finished_at": 1.7e9}
    row = RoundMetrics.from_json(old)
    assert row.reward_mean == 0.5 and row.grad_norm is None and row.kl is None and row.format_rate is None


def _item_seeds(mix: TaskMix, questions) -> set[tuple[str, int]]:
    """reasoning-gym builds item i of a dataset of seed s from Random(s + i): equal seeds, equal item."""
    return {(q.task, mix.datasets[q.task].seed + q.metadata["source_index"]) for q in questions}


def test_every_node_evaluates_the_same_held_out_questions_and_no_worker_trains_on_them():
    tasks = SwarmConfig.from_env({}).tasks
    held_out = held_out_questions(tasks, 100)
    assert len(held_out) == 100 and len({q.task for q in held_out}) == 2
    reserved = _item_seeds(TaskMix(tasks, seed=EVAL_SEED), held_out)
    drawn: set[tuple[str, int]] = set()
    for seed in (0, 42, 31337):
        cfg = SwarmConfig.from_env({"SEED": str(seed)})
        assert held_out_questions(cfg.tasks, 100) == held_out          # nothing of SEED or the node reaches it
        for index in range(8):
            mix = TaskMix(cfg.tasks, seed=cfg.seed + index)            # what worker `index` trains on
            for round_ in range(1, 101):
                drawn |= _item_seeds(mix, mix.sample(2, random.Random(round_seed(cfg, index, round_))))
        warmup = TaskMix(cfg.tasks, seed=cfg.seed + 7919)               # what the warm-up trains on
        drawn |= _item_seeds(warmup, warmup.sample(512, random.Random(cfg.seed)))
    assert len(drawn) > 5000 and not drawn & reserved


def test_held_out_accuracy_is_greedy_counts_answers_cut_off_and_runs_at_start_every_n_and_end(warmed):
    cfg = SwarmConfig.from_env({"MAX_NEW_TOKENS": "16"})
    questions = held_out_questions(cfg.tasks, 24)
    whole = greedy_accuracy(warmed, questions, 16)
    assert whole > 0 and greedy_accuracy(warmed, questions, 16, batch_size=5) == whole   # greedy: no noise
    record = evaluate_held_out(warmed, cfg, questions, "w-1", round_=0)
    assert (record.node, record.round, record.questions, record.accuracy) == ("w-1", 0, 24, whole)
    assert 0 < record.mean_tokens <= 16 and 0 <= record.cut_off < 24      # some answers end: it scored some
    # answers cut at MAX_NEW_TOKENS are counted: an evaluation that takes its longest answer's time says so
    short = evaluate_held_out(warmed, SwarmConfig.from_env({"MAX_NEW_TOKENS": "2"}), questions, "w-1", round_=0)
    assert (short.cut_off, short.mean_tokens, short.accuracy) == (24, 2.0, 0.0)
    assert HeldOutEval.from_json(short.to_json()) == short
    assert [r for r in range(12) if eval_due(r, max_rounds=10, every=4)] == [0, 4, 8, 10, 11]
    assert [r for r in range(11) if eval_due(r, max_rounds=10, every=0)] == [0, 10]


def test_a_round_whose_rollouts_the_folder_refuses_trains_on_local_rollouts_and_says_so(warmed, tmp_path, monkeypatch):
    import workers.shared_folder.exchange as exchange_module
    import workers.shared_folder.retries as retries_module

    monkeypatch.setattr(retries_module.time, "sleep", lambda s: None)
    # 16 questions: the warmed tiny model answers ~6% right, so some group carries signal whichever the sampler's
    # draws (with 4, none did in about a third of the seeds)
    cfg = SwarmConfig.from_env({"NUM_WORKERS": "2", "NUM_TRAIN_SAMPLES": "16", "NUM_TRANSPLANT_TREES": "1",
                                "NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": "16", "ROLLOUT_FETCH_TIMEOUT": "0.5"})
    learner = Policy(copy.deepcopy(warmed.model), warmed.tokenizer, warmed.name, warmed.device)
    optimizer = torch.optim.AdamW(learner.model.parameters(), lr=1e-4)
    exchange = node_exchange(ExperimentFolder(tmp_path).create(), "w-1")

    def refused(path, record):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(exchange_module, "write_json_atomic", refused)
    before = [p.detach().clone() for p in learner.model.parameters()]
    node = Node(learner, optimizer, cfg, TaskMix(cfg.tasks, seed=3), exchange, 0)
    metrics = play_round(node, 1, threading.Event(), lambda: {"w-2"}, lambda stage: None)
    assert metrics is not None and metrics.local_groups == 16 and metrics.external_groups == 0
    assert exchange.trouble["publish"] == ("round 1: rollouts not published (Input/output error); trained on "
                                           "local rollouts")
    assert metrics.zero_advantage_groups < metrics.local_groups            # local groups carried signal...
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))   # ...and were trained on
    monkeypatch.undo()
    play_round(node, 2, threading.Event(), lambda: set(), lambda stage: None)
    assert "publish" not in exchange.trouble                              # the folder works again


@pytest.mark.parametrize("frequency, files", [("generation", ["w-1.part0.json", "w-1.part1.json", "w-1.part2.json"]),
                                               ("stage", ["w-1.json"]), ("round", ["w-1.json"])])
def test_every_publish_frequency_gives_peers_the_same_groups(warmed, tmp_path, frequency, files):
    cfg = SwarmConfig.from_env({"NUM_WORKERS": "1", "NUM_TRAIN_SAMPLES": "3", "NUM_TRANSPLANT_TREES": "0",
                                "MAX_NEW_TOKENS": "16", "ROLLOUT_PUBLISH_FREQUENCY": frequency})
    folder = ExperimentFolder(tmp_path).create()
    learner = Policy(copy.deepcopy(warmed.model), warmed.tokenizer, warmed.name, warmed.device)
    node = Node(learner, torch.optim.AdamW(learner.model.parameters(), lr=1e-5), cfg, TaskMix(cfg.tasks, seed=4),
                node_exchange(folder, "w-1"), 0)
    play_round(node, 1, threading.Event(), lambda: set(), lambda stage: None)
    assert sorted(p.name for p in folder.rollout_dir(1).iterdir()) == files
    [groups] = node_exchange(folder, "w-2").peer_rollouts(1).values()
    questions = TaskMix(cfg.tasks, seed=4).sample(3, random.Random(round_seed(cfg, 0, 1)))
    reader = TaskMix(cfg.tasks, seed=9)                                           # another worker's datasets
    # in order, none lost or doubled, each enough for the reader to build the question again
    assert [reader.rebuild(g.task, g.dataset_seed, g.index) for g in groups] == questions
    assert all(len(g.completions) == 4 for g in groups)
