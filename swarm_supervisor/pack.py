"""`rl-swarm pack`: a wheel and an sdist of this source checkout, put where the Colab cell installs from.

The Colab cell installs, when no PACKAGE is given, the newest build in `<GDRIVE_PATH>/dist/`: a runtime that
mounts the Drive folder then needs neither a public git URL nor PyPI.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from configs_env import SwarmError

BUILD_TIMEOUT_S = 300
SOURCES = ("pyproject.toml", "README.md", "configs_env", "workers", "swarm_supervisor")
# setuptools' PEP 517 hooks, called in a child so the build's imports and chatter stay out of this process
# (the target is read once: the hooks rewrite sys.argv)
BUILD = ("import sys\nfrom setuptools import build_meta as hooks\n"
         "out = sys.argv[1]\nhooks.build_wheel(out)\nhooks.build_sdist(out)\n")


def source_root() -> Path:
    """The checkout this code runs from; an installed copy has no pyproject.toml beside its packages."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise SwarmError(f"rl-swarm pack builds from a source checkout, and {root} is an installed copy: run it "
                         "in the cloned repository (pip install -e .)")
    return root


def pack(dist: Path) -> list[Path]:
    """Build a wheel and an sdist of the checkout into `dist`; each lands whole (built aside, then renamed)."""
    root = source_root()
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rl-swarm-pack-") as scratch:
        # a copy of the sources only: no build/ or *.egg-info left in the checkout, no caches in the wheel
        tree, out = Path(scratch) / "src", Path(scratch) / "out"
        for name in SOURCES:
            source = root / name
            if source.is_dir():
                shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                tree.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, tree / name)
        try:
            result = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=tree, capture_output=True,
                                    text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SwarmError(f"building rl-swarm took over {BUILD_TIMEOUT_S}s and was stopped") from None
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SwarmError(f"building rl-swarm failed ({last}): pip install 'setuptools>=68' and run it again")
        built = []
        for name in sorted(p.name for p in out.iterdir()):
            # copied beside its final name, then renamed: a runtime installing meanwhile sees the old or the new
            partial = dist / f".{name}.partial"
            shutil.copyfile(out / name, partial)
            partial.replace(dist / name)
            built.append(dist / name)
    return built
