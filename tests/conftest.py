import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs_env import SwarmConfig

# No Hugging Face hub on CI machines or here: every load must be offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gcsfs probes a bucket's type over gRPC first (60 s to give up against an emulator that serves only HTTP JSON)
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


# The files of minutes, longest first (a 2-core run's --durations, each file's tests added up): under -n they start
# before every other file, longest-first, so the short files fill the end of the run on both workers. pytest-xdist
# would order files by their number of tests (pyproject's addopts turn that off): the learning run's one-test file
# started last, 14 minutes in, and ran its 7 minutes while the other worker had nothing left to start.
LONGEST_FILES = ("test_swarm_learns.py", "test_notebooks.py", "test_e2e.py", "test_slow_drive.py", "test_sapo_table.py",
                 "test_object_store_swarm.py", "test_bench_peers.py", "test_supervision.py", "test_warmup.py")


def pytest_collection_modifyitems(config, items):
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: a file's tests keep their order
    if "long" not in (config.getoption("markexpr") or ""):
        wait = pytest.mark.skip(reason="minutes long: run with -m long")
        for item in items:
            if "long" in item.keywords:
                item.add_marker(wait)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """The tests' own torch work runs on one thread, as a worker's does: the tiny model is no faster on two, and
    two threads beside a busy process wait on each other (the learning test: 130 s on two, 23 s on one)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """The tiny offline model is built once a session: every process the tests start reads it from here."""
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["RL_SWARM_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def warm_base(tmp_path_factory) -> SwarmConfig:
    """TEST_MODE's warm-up, run once a run: swarms whose story is not the warm-up start from a copy of its base.
    pytest-xdist's workers share it (each warmed up its own: 40 s of CPU more), the first to need it makes it while
    the others wait; it keeps its own model cache, which holds the key of the coordinator that signed it."""
    from tests.helpers import swarm_env

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent / "warm-base" if shared else tmp_path_factory.mktemp("warm-base")
    root.mkdir(exist_ok=True)
    cfg = SwarmConfig(gdrive_path=root / "drive", experiment_name="e2e", cache_dir=root / "cache")
    with open(root / ".lock", "w") as lock:
        deadline = time.monotonic() + 900       # another worker's warm-up: at most its 600 s, and its start
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"another test worker held {root / '.lock'} for 900 s"
                time.sleep(0.5)
        if not (cfg.experiment_dir / "base" / "meta.json").exists():
            result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "pretrain"],
                                    env={**swarm_env(root), "RL_SWARM_CACHE": str(cfg.cache_dir)},
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stdout + result.stderr
    return cfg


@pytest.fixture(scope="session")
def start_from_base(warm_base, model_cache):
    """Copies the run's warmed-up base into an experiment folder, signed by that experiment's coordinator key
    (as the SAPO table copies a base), so its `up` skips the warm-up."""
    from swarm_supervisor.table import copy_base

    def copy(exp: Path) -> None:
        copy_base(warm_base, SwarmConfig(gdrive_path=exp.parent.parent, experiment_name=exp.name,
                                         cache_dir=model_cache))
    return copy


@pytest.fixture
def key(tmp_path):
    """w-1's key, in a machine's key folder beside tmp_path (never in the shared folder); made by this test."""
    from workers.shared_folder.signing import NodeKey

    return NodeKey.load_or_create(tmp_path.parent / f"{tmp_path.name}.keys", "w-1")


@pytest.fixture
def no_reader_blocks():
    """A reader blocked on a FIFO would hang the suite: a test that plants one asks for this, and fails instead."""
    def blocked(signum, frame):
        # pytest.fail, not TimeoutError: that is an OSError, which a reader takes for a Drive hiccup and retries
        pytest.fail("a reader or writer blocked (on a FIFO?)")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def pytest_configure(config):
    """pytest-xdist's workers run with SIGINT and SIGHUP ignored, and an ignored signal stays ignored through exec:
    every `up` a test started under -n ignored its Ctrl-C and took its terminal's hang-up for nohup (and one
    left warming up outlived the suite). The tests' processes start with the dispositions a shell gives them."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    # pytest-xdist sorts files by test count, which would start the one-test learning run last: LONGEST_FILES'
    # order instead (set here, not in addopts, so a machine without xdist, the GPU's, still runs pytest)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
