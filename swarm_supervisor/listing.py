"""Which experiments a shared folder (or a bucket) holds, and one of them by name: a wrong GDRIVE_PATH, SWARM_URL
or name is one line naming what is there, never an empty table."""

from dataclasses import dataclass
from pathlib import Path

from configs_env import SwarmConfig
from configs_env.parsing import safe_name
from swarm_supervisor.preflight import shown_path
from swarm_supervisor.readable import plain
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.rejections import FolderError, warn_once
from workers.shared_folder.safe_io import is_visible, list_folder, list_names
from workers.shared_folder.storage import experiment_names, mount_experiment


@dataclass(frozen=True)
class Listing:
    """The experiments under GDRIVE_PATH (with SWARM_URL: in its bucket), as `experiments` and `status` find them."""

    roots: list[Path]       # experiments some node wrote to
    empty: list[Path]       # folders of an experiment nothing of a swarm was ever written to
    where: str              # GDRIVE_PATH=... or SWARM_URL=..., as the user set it
    why_none: str           # when the folder of experiments is not there: why (no such folder, a file); else ""

    @property
    def known(self) -> str:
        """The experiments that are there, for a line about one that is not: `known: a, b`, or why there are none."""
        names = [root.name for root in self.roots]
        if not names:
            return (self.why_none or "it holds none") + self.hint
        more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
        return f"known: {', '.join(names[:MAX_NAMED])}{more}"

    @property
    def hint(self) -> str:
        if self.where.startswith("SWARM_URL="):
            return " (set SWARM_URL to the one `rl-swarm up` used)"
        return " (set GDRIVE_PATH to the folder `rl-swarm up` used)"

    def none_found(self) -> str:
        """The one line of a listing that found no experiment."""
        why = f", {self.why_none}" if self.why_none else ""
        return plain(f"no experiments under {self.where}{why}{self.hint}{self.empty_note()}")

    def empty_note(self) -> str:
        if not self.empty:
            return ""
        names = ", ".join(root.name for root in self.empty[:MAX_NAMED])
        return plain(f"; not listed: {len(self.empty)} experiment folder(s) no coordinator ever wrote to (no config, "
                     f"key or round): {names}")

    def unknown(self, names: list[str]) -> FolderError:
        """One line for experiments asked for by name that are not here, or are empty folders."""
        empty = {root.name for root in self.empty}
        absent = [name for name in names if name not in empty]
        if absent:
            return FolderError(plain(f"no experiment named {', '.join(absent)} under {self.where}: {self.known}"))
        name = names[0]
        others = f"; {self.known}" if self.roots else ""
        return FolderError(plain(f"experiment {name} under {self.where} is empty: no coordinator ever wrote to it "
                                 f"(start it with EXPERIMENT_NAME={name} rl-swarm up){others}"))


MAX_NAMED = 20      # experiments a line names at most


def where_shown(cfg: SwarmConfig) -> str:
    return f"SWARM_URL={cfg.swarm_url}" if cfg.swarm_url else shown_path("GDRIVE_PATH", cfg.gdrive_path)


def holds_records(folder: ExperimentFolder) -> bool:
    """Whether anything of a swarm was ever written to the experiment: its config.json, a key (a coordinator's is
    there from its warm-up on), a round state or lease, a heartbeat, metrics, or a base. False for the bare folders an
    older `rl-swarm worker` made while it waited for a coordinator that never came (or one made by hand). True on a
    Drive hiccup: an experiment is not hidden for a failed look."""
    try:
        if is_visible(folder.config_file) or folder.base_dir.is_dir():
            return True
        return any(list_names(folder.root / sub, limit=1, warn_when_cut=False)
                   for sub in ("keys", "state", "peers", "metrics"))
    except OSError:
        return True


def list_experiments(cfg: SwarmConfig) -> Listing:
    """The experiments under GDRIVE_PATH, at most MAX_LISTED, and never a link a peer planted there (a folder of
    this machine); with SWARM_URL, those in its bucket (each mounted in this process). Folders nothing was written
    to are kept apart (Listing.empty)."""
    base = cfg.gdrive_path / "experiments"
    why_none = ""
    if cfg.swarm_url is None:
        found = []
        for path in list_folder(base):
            if path.is_symlink():
                warn_once(f"{path}: a link, not an experiment; not followed")
            elif path.is_dir():
                found.append(path)
        if not base.is_dir():
            why_none = "no such folder" if not cfg.gdrive_path.exists() else \
                "a file, not a folder" if not cfg.gdrive_path.is_dir() else "which has no experiments/ folder"
    else:
        try:
            names = experiment_names(cfg.swarm_url)
        except OSError as exc:
            raise unreachable(f"{cfg.swarm_url}/experiments", exc) from exc
        for name in names:
            mount_experiment(cfg.swarm_url, base / name, name)
        found = [base / name for name in names]
    roots, empty = [], []
    for root in found:
        (roots if holds_records(ExperimentFolder(root)) else empty).append(root)
    return Listing(roots, empty, where_shown(cfg), why_none)


def experiment_roots(cfg: SwarmConfig) -> list[Path]:
    """The experiments under GDRIVE_PATH (or in SWARM_URL's bucket) that some node wrote to."""
    return list_experiments(cfg).roots


def experiment_folder(cfg: SwarmConfig, name: str, name_others: bool = True) -> ExperimentFolder:
    """The experiment `name` (its records in SWARM_URL's bucket when set); FolderError naming where it looked and
    (`name_others`: a listing of them all, for a person to read) the experiments that are there."""
    root = cfg.gdrive_path / "experiments" / safe_name("experiment", name)
    store = mount_experiment(cfg.swarm_url, root, root.name)
    if store is None:
        found = root.is_dir()
    else:
        try:
            found = bool(store.list("", limit=1))
        except OSError as exc:
            raise unreachable(store.url, exc) from exc
    if not found or not holds_records(ExperimentFolder(root)):
        if not name_others:
            raise FolderError(plain(f"no experiment named {root.name} under {where_shown(cfg)} yet"))
        raise list_experiments(cfg).unknown([root.name])
    return ExperimentFolder(root)


def unreachable(url: str, error: OSError) -> FolderError:
    return FolderError(f"{url} cannot be listed ({error.strerror or error}): check SWARM_URL (its bucket must "
                       "exist), AWS_ENDPOINT_URL and the credentials")
