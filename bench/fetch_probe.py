"""What a worker's hand-off of rollouts costs in CPU, outside the GPU's work: its groups scored and published,
then its peers' files read (parsed, checksummed, signature verified, fields checked) and their groups rebuilt,
their token ids checked against their text, and scored again. The paper's shape by default (8 workers, I=4, G=8).

    python -m bench.fetch_probe [TOKENS [PEERS]]     (CPU or GPU machine alike; default 128 7; NOTES.md)

Completions are random GPT-2 tokens, TOKENS long (MAX_NEW_TOKENS); nothing is generated.
"""

import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from configs_env import SwarmConfig
from workers.learning.generation import Completion
from workers.learning.model import load_policy
from workers.learning.tasks import TaskMix, build_prompt
from workers.round_loop import external_candidates, score_local
from workers.shared_folder.exchange import Exchange
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.signing import KeyRing, NodeKey


def random_group(tokenizer, size: int, tokens: int, rng: random.Random) -> list[Completion]:  # noqa: ANN001
    """`size` completions of ids that spell their text (text decoded, encoded again, cut)."""
    group = []
    for _ in range(size):
        text = tokenizer.decode([rng.randrange(300, 50_000) for _ in range(tokens)], skip_special_tokens=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        group.append(Completion(prompt_ids=(1,), ids=tuple(ids), text=tokenizer.decode(ids, skip_special_tokens=True),
                                finished=False))
    return group


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    peers = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(root), "EXPERIMENT_NAME": "probe", "NUM_GENERATIONS": "8",
                                "NUM_TRAIN_SAMPLES": "4", "NUM_TRANSPLANT_TREES": "4", "MAX_NEW_TOKENS": str(tokens)})
    policy = load_policy("rl-swarm/gpt2-124m-random", torch.device("cpu"), cfg.cache_dir)
    folder = ExperimentFolder(cfg.experiment_dir).create()
    tasks, rng = TaskMix(cfg.tasks, seed=1), random.Random(0)

    def exchange(node: str) -> Exchange:
        key = NodeKey.load_or_create(root / "keys", node)
        KeyRing(folder).publish(key)
        return Exchange(folder, node, key)

    scored = published = 0.0
    nodes = [f"worker-{number}" for number in range(2, peers + 2)]
    for node in nodes:
        questions = tasks.sample(cfg.num_train_samples, rng)
        prompts = [build_prompt(question.question) for question in questions]
        sampled = [random_group(policy.tokenizer, cfg.num_generations, tokens, rng) for _ in prompts]
        started = time.process_time()
        shared, _, _ = score_local(cfg, questions, prompts, sampled)
        scored += time.process_time() - started
        started = time.process_time()
        exchange(node).publish_rollouts(1, shared)
        published += time.process_time() - started
    reader = exchange("worker-1")
    started = time.process_time()
    found = reader.wait_for_peers(1, set(nodes), 10, threading.Event())
    read = time.process_time()
    _, available = external_candidates(policy, cfg, tasks, found, reader, 1)
    rebuilt = time.process_time()
    print(f"{peers} peers x {cfg.num_train_samples} groups x {cfg.num_generations} completions of {tokens} tokens, "
          f"CPU milliseconds per worker and round:")
    print(f"  its own groups scored: {scored / peers * 1000:.1f}; published (JSON, checksum, signed, synced): "
          f"{published / peers * 1000:.1f}")
    print(f"  its peers' {len(found)} files read: {(read - started) * 1000:.1f}; their {available} groups rebuilt, "
          f"ids checked and scored again: {(rebuilt - read) * 1000:.1f}")


if __name__ == "__main__":
    main()
