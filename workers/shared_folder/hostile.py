"""Hostile files for tests and trials: one file of each kind a reader of the shared folder must refuse."""

import json
import time
from pathlib import Path

from workers.shared_folder.folder import MAX_RECORD_BYTES, record_checksum


def _group(task: str = "chain_sum", rewards: list | None = None) -> dict:
    return {"task": task, "dataset_seed": 0, "index": 0, "question": "3 + 4 =", "answer": "7",
            "metadata": {"source_dataset": task},
            "prompt": "3 + 4 =\nAnswer:", "completions": [" <answer>7</answer>", " <answer>8</answer>"] * 2,
            "finished": [True] * 4, "rewards": rewards if rewards is not None else [1.0, 0.0, 1.0, 0.0]}


def plant_hostile_files(experiment_root: Path, round_: int = 1) -> dict[str, Path]:
    """One hostile file of each kind in the round's rollouts and in peers/, by kind. The writers' own
    checksum is used where a kind is about what a reader checks after it (a forger can compute it too)."""
    def sealed(record: dict) -> str:
        return json.dumps({**record, "sha256": record_checksum(record)})

    def rollouts(node: str, **fields: object) -> dict:
        return {"schema": 1, "node": node, "round": round_, "stage": 0, "created_at": time.time(),
                "groups": [_group()], **fields}

    stage = Path(experiment_root) / "rollouts" / f"round_{round_}" / "stage_0"
    peers = Path(experiment_root) / "peers"
    stage.mkdir(parents=True, exist_ok=True)
    peers.mkdir(parents=True, exist_ok=True)
    whole = sealed(rollouts("hostile-2"))
    edited = json.loads(sealed(rollouts("hostile-8")))
    edited["groups"][0]["answer"] = "8"                     # valid JSON, valid types: not what was sealed
    contents = {
        "malformed JSON": ("hostile-1.json", "{not json"),
        "truncated": ("hostile-2.json", whole[: len(whole) // 2]),
        "oversized": ("hostile-3.json", '{"pad": "' + "x" * (MAX_RECORD_BYTES + 16) + '"}'),
        "unsafe node id": ("hostile-4.json", sealed(rollouts("../../etc"))),
        "wrong field types": ("hostile-5.json", sealed(rollouts("hostile-5", groups=[_group(rewards=["high"] * 4)]))),
        "unknown task": ("hostile-6.json", sealed(rollouts("hostile-6", groups=[_group("no_such_task")]))),
        "future schema": ("hostile-7.json", sealed(rollouts("hostile-7", schema=99))),
        "checksum mismatch": ("hostile-8.json", json.dumps(edited)),
    }
    planted = {}
    for kind, (name, text) in contents.items():
        planted[kind] = stage / name
        planted[kind].write_text(text, encoding="utf-8")
    planted["bad heartbeat"] = peers / "hostile-9.json"
    planted["bad heartbeat"].write_text(sealed({"schema": 1, "node": "../../etc", "role": "worker"}), encoding="utf-8")
    return planted
