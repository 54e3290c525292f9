import os
import subprocess
import sys
from pathlib import Path

import pytest

# No Hugging Face hub on CI machines or here: every load must be offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gcsfs probes a bucket's type over gRPC first (60 s to give up against an emulator that serves only HTTP JSON)
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def pytest_collection_modifyitems(config, items):
    import torch

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
def warm_base(tmp_path_factory, model_cache) -> Path:
    """TEST_MODE's warm-up, run once: swarms whose story is not the warm-up start from a copy of its base."""
    from tests.helpers import swarm_env

    root = tmp_path_factory.mktemp("warm-base")
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "pretrain"], env=swarm_env(root),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "drive" / "experiments" / "e2e" / "base"


@pytest.fixture(scope="session")
def start_from_base(warm_base, model_cache):
    """Copies the session's warmed-up base into an experiment folder, signed by that experiment's coordinator key
    (as the SAPO table copies a base), so its `up` skips the warm-up."""
    from configs_env import SwarmConfig
    from swarm_supervisor.table import copy_base

    def experiment(root: Path) -> SwarmConfig:
        return SwarmConfig(gdrive_path=root.parent.parent, experiment_name=root.name, cache_dir=model_cache)

    def copy(exp: Path) -> None:
        copy_base(experiment(warm_base.parent), experiment(exp))
    return copy


@pytest.fixture
def key(tmp_path):
    """w-1's key, in a machine's key folder beside tmp_path (never in the shared folder); made by this test."""
    from workers.shared_folder.signing import NodeKey

    return NodeKey.load_or_create(tmp_path.parent / f"{tmp_path.name}.keys", "w-1")
