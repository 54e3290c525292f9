"""What a round costs a worker in the shared folder outside its work, in CPU milliseconds per call: listing the
round states of a long run, a waiting worker's poll for its next round, a signed heartbeat written, and its
peers' heartbeats read (verified, and read again unchanged). A local folder: the lower bound a Drive or a
bucket adds its latency to.

    python -m bench.folder_probe [ROUNDS...]     (CPU or GPU machine alike; default 200 2000 3000; NOTES.md)
"""

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from workers.shared_folder.exchange import NEWEST_LOOKED, Exchange, read_heartbeats
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import write_json_atomic
from workers.shared_folder.protocol import Heartbeat, RoundState, Status
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey

PEERS = ("worker-2", "worker-3", "worker-4", COORDINATOR)


def cpu_ms(what: str, call: Callable[[], object], times: int = 50) -> float:
    """Mean CPU milliseconds of `call` over `times` calls, printed."""
    call()                          # caches and imports warm
    started = time.process_time()
    for _ in range(times):
        call()
    ms = (time.process_time() - started) * 1000 / times
    print(f"  {what}: {ms:.3f} ms of CPU", flush=True)
    return ms


def exchange_of(folder: ExperimentFolder, keys: Path, node: str) -> Exchange:
    key = NodeKey.load_or_create(keys, node)
    KeyRing(folder).publish(key)
    return Exchange(folder, node, key)


def main() -> None:
    rounds = [int(arg) for arg in sys.argv[1:]] or [200, 2000, 3000]
    with tempfile.TemporaryDirectory() as root:
        folder = ExperimentFolder(Path(root) / "experiments" / "probe")
        folder.create()
        keys = Path(root) / "keys"
        peers = {node: exchange_of(folder, keys, node) for node in PEERS}
        reader = exchange_of(folder, keys, "worker-1")
        coordinator = peers[COORDINATOR].key
        written = 0
        for count in sorted(rounds):
            for round_ in range(written + 1, count + 1):
                state = RoundState(round_, 10_000, time.time(), "all workers done")
                write_json_atomic(folder.round_state_file(round_), coordinator.sign(state.to_json()))
            written = count
            print(f"state/ holding {count} rounds:")
            cpu_ms("listing state/ (a worker's look every 2 s, the supervisor's view)", folder.state_rounds)
            cpu_ms("a waiting worker's poll that finds no new round",
                   lambda count=count: folder.state_rounds_from(count + 1, NEWEST_LOOKED))
        for node, exchange in peers.items():
            exchange.write_heartbeat(Heartbeat.first(node, "coordinator" if node == COORDINATOR else "worker",
                                                     Status.TRAINING))
        print(f"heartbeats of {len(PEERS)} peers:")
        beat = Heartbeat.first("worker-1", "worker", Status.GENERATING)
        cpu_ms("one signed heartbeat written (fsync'd)", lambda: reader.write_heartbeat(beat))
        cpu_ms("all read, each parsed and its signature verified", lambda: read_heartbeats(folder, reader.keyring))
        cpu_ms("all read again unchanged (a worker's read each round)", reader.read_heartbeats)


if __name__ == "__main__":
    main()
