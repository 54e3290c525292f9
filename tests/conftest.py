import os
from pathlib import Path

import pytest

# No Hugging Face hub on CI machines or here: every load must be offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """The tiny offline model is built once a session: every process the tests start reads it from here."""
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["RL_SWARM_CACHE"] = str(cache)
    return cache
