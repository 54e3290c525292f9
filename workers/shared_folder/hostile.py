"""Hostile files for tests and trials: one file of each kind a reader of the shared folder must refuse, and
forgeries of records that speak for the coordinator or for another node. They are written as any record is
(safe_io), so under SWARM_URL they land in the object store, as a peer with the bucket's credentials would put
them."""

import json
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import MAX_RECORD_BYTES, record_checksum
from workers.shared_folder.protocol import SCHEMA, Heartbeat, RoundState, Status, SwarmFinished
from workers.shared_folder.safe_io import write_atomic
from workers.shared_folder.signing import KeyRing, NodeKey


def _group(task: str = "chain_sum", rewards: list | None = None) -> dict:
    return {"task": task, "dataset_seed": 0, "index": 0, "question": "3 + 4 =", "answer": "7",
            "metadata": {"source_dataset": task},
            "prompt": "3 + 4 =\nAnswer:", "completions": [" <answer>7</answer>", " <answer>8</answer>"] * 2,
            "finished": [True] * 4, "rewards": rewards if rewards is not None else [1.0, 0.0, 1.0, 0.0]}


def _sealed(record: dict) -> str:
    return json.dumps({**record, "sha256": record_checksum(record)})


def plant_hostile_files(experiment_root: Path, round_: int = 1) -> dict[str, Path]:
    """One hostile file of each kind in the round's rollouts and in peers/, by kind. Each is signed by the node
    its name says, a hostile peer with a key of its own, where the kind is about what a reader checks after the
    signature (a peer can sign its own files, and compute the checksum too)."""
    folder = ExperimentFolder(experiment_root)
    keys = KeyRing(folder)

    def signed(node: str, record: dict) -> str:
        key = NodeKey(node, Ed25519PrivateKey.generate())
        keys.publish(key)
        return _sealed(key.sign(record))

    def rollouts(node: str, **fields: object) -> dict:
        return {"schema": SCHEMA, "node": node, "round": round_, "stage": 0, "created_at": time.time(),
                "groups": [_group()], **fields}

    stage = folder.rollout_dir(round_)
    whole = signed("hostile-2", rollouts("hostile-2"))
    edited = json.loads(signed("hostile-8", rollouts("hostile-8")))
    edited["groups"][0]["answer"] = "8"                     # valid JSON, valid types: not what was sealed
    contents = {
        "malformed JSON": ("hostile-1.json", "{not json"),
        "truncated": ("hostile-2.json", whole[: len(whole) // 2]),
        "oversized": ("hostile-3.json", '{"pad": "' + "x" * (MAX_RECORD_BYTES + 16) + '"}'),
        "unsafe node id": ("hostile-4.json", signed("hostile-4", rollouts("../../etc"))),
        "wrong field types": ("hostile-5.json", signed("hostile-5", rollouts("hostile-5",
                                                                           groups=[_group(rewards=["high"] * 4)]))),
        "unknown task": ("hostile-6.json", signed("hostile-6", rollouts("hostile-6", groups=[_group("no_such_task")]))),
        "future schema": ("hostile-7.json", signed("hostile-7", rollouts("hostile-7", schema=99))),
        "checksum mismatch": ("hostile-8.json", json.dumps(edited)),
    }
    planted = {}
    for kind, (name, text) in contents.items():
        planted[kind] = stage / name
        write_atomic(planted[kind], text.encode())
    planted["bad heartbeat"] = folder.peers_dir / "hostile-9.json"
    write_atomic(planted["bad heartbeat"],
                 signed("hostile-9", {"schema": SCHEMA, "node": "../../etc", "role": "worker"}).encode())
    return planted


def forger() -> NodeKey:
    """A key of nobody in the swarm: what anyone with write access to the folder can sign with."""
    return NodeKey("mallory", Ed25519PrivateKey.generate())


def plant_forgeries(experiment_root: Path, victim: str, later_round: int, far_round: int) -> dict[str, Path]:
    """Records that speak for the coordinator or for `victim` but are signed by a forger, by kind: a later round
    state and a far one (skip the swarm ahead), finished.json (end it), the victim's heartbeat saying it is done
    (stop rounds waiting for it), rollouts and a rewards file in its name (speak for it, end its rounds early)."""
    folder = ExperimentFolder(experiment_root)
    key = forger()
    now = time.time()

    def plant(path: Path, record: dict) -> Path:
        write_atomic(path, _sealed(key.sign(record)).encode())
        return path

    state = RoundState(round=later_round, max_rounds=far_round, started_at=now, reason="forged", nodes=(victim,))
    beat = Heartbeat(node=victim, role="worker", pid=1, host="elsewhere", instance="forged", status=Status.DONE,
                     round=far_round, started_at=now, updated_at=now)
    return {
        "later round state": plant(folder.round_state_file(later_round), state.to_json()),
        "far round state": plant(folder.round_state_file(far_round),
                                 {**state.to_json(), "round": far_round}),
        "finished.json": plant(folder.finished_file, SwarmFinished(rounds=later_round, finished_at=now).to_json()),
        "heartbeat": plant(folder.heartbeat_file(victim), beat.to_json()),
        "rollouts": plant(folder.rollout_file(later_round, victim, part=7),
                          {"schema": SCHEMA, "node": victim, "round": later_round, "stage": 0, "created_at": now,
                           "groups": [_group()]}),
        "rewards": plant(folder.reward_file(later_round, victim), {"schema": SCHEMA, "node": victim,
                                                                  "round": later_round}),
    }
