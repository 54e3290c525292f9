"""Helpers the tests share: a swarm's environment, running `rl-swarm up`, reading its files, drawing a frame,
a peer's group, the records a peer writes, nodes' keys. A hostile folder's entries are in hostile_files.py, the
object-store servers in store_servers.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from rich.console import Console

from workers.learning.tasks import Question
from workers.shared_folder.protocol import RolloutGroup


def swarm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """TEST_MODE on the CPU in `tmp_path`; RL_SWARM_CACHE comes from the session (conftest's model_cache)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUM_", "MAX_", "ROLLOUT_", "PRESET"))}
    env.update({"GDRIVE_PATH": str(tmp_path / "drive"), "EXPERIMENT_NAME": "e2e", "TEST_MODE": "True",
                "MODEL_NAME": "rl-swarm/tiny-gpt2", "HF_HUB_OFFLINE": "1", "DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_up(env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=env, capture_output=True,
                          text=True, timeout=timeout)


class Up:
    """`rl-swarm up` (or another command) in the background, its output going to a file, not a pipe: a pipe the
    test does not read while it waits fills at 64 KiB and then blocks the supervisor in mid-print (seen in CI: the
    warnings of a minute's dropped mount stopped the supervisor's loop until the test read them)."""

    def __init__(self, env: dict[str, str], log: Path, command: str = "up"):
        self.log = log
        with log.open("w") as out:      # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", command], env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> str:
        """The exit code is in `returncode` after it; returns everything it printed."""
        self.proc.wait(timeout=timeout)
        return self.output()


def join_from_another_machine(env: dict[str, str], machine: Path, node: str = "colab2", timeout: float = 300,
                              **extra: str) -> subprocess.CompletedProcess:
    """`rl-swarm worker` (one node) as from another machine: its own temp folder, so no doorbell of this host
    reaches it and it polls the folder, and whatever else `extra` gives it of its own (GDRIVE_PATH)."""
    (machine / "tmp").mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "swarm_supervisor", "worker"],
                          env={**env, "NODE_ID": node, "NUM_WORKERS": "1", "TMPDIR": str(machine / "tmp"), **extra},
                          capture_output=True, text=True, timeout=timeout)


def survivors(pids: list[int], grace_s: float) -> list[str]:
    """Processes still running after a grace period (multiprocessing's helper exits when it sees EOF)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(proc.cmdline())[:200])
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def entries_of(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root`, with its size and mtime: a file made and removed since changes its
    folder's mtime."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def metrics_rows(exp: Path, node: str) -> list[dict]:
    path = exp / "metrics" / node / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def console_text(renderable: object, width: int = 160) -> str:
    """What a terminal of `width` columns shows, without colours."""
    console = Console(record=True, width=width, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def peer_group(question: Question, answers: list[str], claimed: float = 1.0, **fields: object) -> RolloutGroup:
    """A peer's group naming `question`, one finished completion ending in each answer; `fields` forge the rest."""
    return RolloutGroup(**{"task": question.task, "dataset_seed": question.dataset_seed, "index": question.index,
                           "completions": tuple(f" <answer>{a}</answer>" for a in answers),
                           "finished": (True,) * len(answers), "rewards": (claimed,) * len(answers), **fields})


def warnings_naming(caplog, path: Path) -> int:
    """How many warnings the readers logged about `path`."""
    return sum(str(path) in record.getMessage() for record in caplog.records if record.levelname == "WARNING")


def metrics_row(node: str, round_: int, reward: float = 0.5) -> dict:
    from workers.shared_folder.protocol import RoundMetrics

    return RoundMetrics(node=node, round=round_, reward_mean=reward, accuracy=0.5, loss=0.1, local_groups=2,
                        external_groups=0, external_available=0, zero_advantage_groups=0, completions=8,
                        mean_completion_tokens=10.0, generate_s=1.0, fetch_s=0.0, train_s=1.0, round_s=2.0).to_json()


def heartbeat_record(node: str, **changes: object) -> dict:
    from workers.shared_folder.protocol import Heartbeat

    now = time.time()
    beat = Heartbeat(node=node, role="worker", pid=1, host="elsewhere", instance="i", status="waiting", round=1,
                     started_at=now, updated_at=now)
    return {**beat.to_json(), **changes}


def rollouts_record(node: str, round_: int = 1) -> dict:
    """A valid rollout file of one group, as a peer publishes it."""
    return {"schema": 1, "node": node, "round": round_, "stage": 0, "created_at": time.time(),
            "groups": [{"task": "chain_sum", "question": "3 + 4 =", "answer": "7", "metadata": {},
                        "prompt": "3 + 4 =\nAnswer:", "completions": [" <answer>7</answer>", " <answer>8</answer>"],
                        "finished": [True, True], "rewards": [1.0, 0.0]}]}


def heartbeat(exp, node):
    try:
        return json.loads((exp / "peers" / f"{node}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for(predicate, timeout, what, proc):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            output = proc.output() if isinstance(proc, Up) else proc.stdout.read()
            raise AssertionError(f"the supervisor exited while waiting for {what}: {output}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def group(g: int = 4, task: str = "chain_sum") -> RolloutGroup:
    return RolloutGroup(task=task, dataset_seed=42 * 1009, index=7,
                        completions=tuple(f"<answer>{i}</answer>" for i in range(g)),
                        finished=(True,) * g, rewards=(0.0,) * g)


class StandInNVML:
    """The pynvml calls the monitor makes, over GPUs given as (total MiB, used MiB, {pid: MiB}) in host order;
    GPU i's UUID is GPU-i."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[tuple[float, float, dict[int, float]]]):
        self.gpus = gpus

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return self.nvmlDeviceGetHandleByIndex(int(uuid.removeprefix("GPU-")))

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        from types import SimpleNamespace

        total, used, _ = self.gpus[handle]
        return SimpleNamespace(total=total * 2**20, used=used * 2**20, free=(total - used) * 2**20)

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100"

    def nvmlDeviceGetUtilizationRates(self, handle: int):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:
        from types import SimpleNamespace

        return [SimpleNamespace(pid=pid, usedGpuMemory=mib * 2**20) for pid, mib in self.gpus[handle][2].items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list:
        return []


# -- nodes' keys: every record that speaks for a node is signed by it ------------------------------------------

def node_key(folder, node: str):
    """`node`'s key, kept beside the experiment folder (never in it, as a machine's key folder), published in it."""
    from workers.shared_folder.signing import KeyRing, NodeKey

    key = NodeKey.load_or_create(folder.root.with_name(folder.root.name + ".keys"), node)
    KeyRing(folder).publish(key)
    return key


def node_exchange(folder, node: str):
    """The exchange of `node`, as a worker of this machine has it."""
    from workers.shared_folder.exchange import Exchange

    return Exchange(folder, node, node_key(folder, node))


def write_as(folder, node: str, path: Path, record: dict) -> None:
    """`record` written at `path`, signed by `node` as that node writes it."""
    from workers.shared_folder.json_records import write_json_atomic

    write_json_atomic(path, node_key(folder, node).sign(record))


def keyring(folder):
    from workers.shared_folder.signing import KeyRing

    return KeyRing(folder)


def coordinators_up(folder, cfg):
    """The claim an `up` of the experiment's coordinator holds while it runs (`with ....held() as claim:`), this
    process standing for it; config.json names its lease's instance."""
    from swarm_supervisor.claim import CoordinatorClaim

    return CoordinatorClaim(cfg, folder, node_key(folder, "coordinator"), keyring(folder), "up")


def append_as(folder, node: str, path: Path, record: dict) -> None:
    """`record` appended as a line of `path`, signed by `node` as that node appends its metrics and evaluations."""
    from workers.shared_folder.jsonl import append_jsonl

    append_jsonl(path, node_key(folder, node).sign(record))


def key_of_an_older_rl_swarm(key_dir: Path, node: str):
    """`node`'s key as an rl-swarm before signed checkpoints and bases made it (no marker beside it): unsigned ones
    in the folder may be that node's own."""
    from workers.shared_folder.signing import SIGNS_FILES, NodeKey

    key = NodeKey.load_or_create(key_dir, node)
    key.path.with_name(key.path.name + SIGNS_FILES).unlink(missing_ok=True)
    return NodeKey.load_or_create(key_dir, node)


def viewer(folder):
    """The config of `rl-swarm status` on a machine whose key folder (its pins) lies beside the experiment's, never
    in the home folder."""
    from configs_env import SwarmConfig

    return SwarmConfig(cache_dir=folder.root.with_name(folder.root.name + ".viewer-cache"))
