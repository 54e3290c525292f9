"""External groups are re-scored here; ragged or unknown ones are rejected with one warning, never a crash."""

import pytest
import torch

from configs_env import SwarmConfig
from workers.exchange import Exchange
from workers.folder import ExperimentFolder
from workers.model import load_policy
from workers.protocol import RolloutGroup
from workers.round_loop import external_candidates
from workers.tasks import TaskMix


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    torch.set_num_threads(2)
    return load_policy("rl-swarm/tiny-gpt2", "cpu", tmp_path_factory.mktemp("cache"))


def peer_group(task: str, answers: list[str], claimed: float = 1.0) -> RolloutGroup:
    return RolloutGroup(task=task, question="State the final answer to the following arithmetic problem: 3 + 4 =",
                        answer="7", metadata={"source_dataset": task}, prompt="3 + 4 =\nAnswer:",
                        completions=tuple(f" <answer>{a}</answer>" for a in answers),
                        finished=(True,) * len(answers), rewards=(claimed,) * len(answers))


def test_peers_groups_are_rescored_ragged_and_unknown_ones_rejected(policy, tmp_path, caplog):
    cfg = SwarmConfig.from_env({"NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": "16"})
    tasks = TaskMix(cfg.tasks, seed=0)
    exchange = Exchange(ExperimentFolder(tmp_path).create(), "w-1")
    peers = {
        "w-2": [peer_group("chain_sum", ["7", "8", "7", "1"]),            # signal: kept, re-scored here
                peer_group("chain_sum", ["7", "8", "9"]),                 # G=3 while we use G=4: rejected
                peer_group("chain_sum", ["1", "2", "3", "4"], claimed=1.0)],   # claims 1.0, really all 0: no signal
        "w-3": [peer_group("leg_counting", ["7", "8", "7", "1"])],       # a task not in our TASKS: rejected
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
