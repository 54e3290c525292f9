"""A wrong GDRIVE_PATH or experiment name is one line, never a traceback nor a silent empty answer: a command that
writes there checks GDRIVE_PATH once before anything starts; a reading command names where it looked and what is
there; a joiner says at once which coordinator it waits for, and makes no experiment folder of its own."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from configs_env import ConfigError, SwarmConfig, SwarmError
from swarm_supervisor import cli
from swarm_supervisor import join
from swarm_supervisor.join import join_when_ready
from swarm_supervisor.resume import Resume
from workers.shared_folder.recorded_config import write_recorded_config
from swarm_supervisor.listing import experiment_roots, holds_records
from swarm_supervisor.preflight import check_gdrive_path
from tests.helpers import coordinators_up, entries_of, node_key, swarm_env, write_as
from workers.shared_folder.base_meta import sign_base_meta
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import write_json_atomic
from workers.shared_folder.protocol import SwarmFinished
from workers.shared_folder.signing import COORDINATOR

# every command that writes under GDRIVE_PATH
WRITERS = (["up"], ["worker"], ["join"], ["pretrain"], ["sapo-table"], ["sapo-table", "--report"], ["pack"],
           ["experiments", "plot"])


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """RL_SWARM_CACHE of this test alone, outside the folders it looks at."""
    monkeypatch.setenv("RL_SWARM_CACHE", str(tmp_path_factory.mktemp("cache")))


def rl_swarm(monkeypatch, capsys, gdrive: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """`rl-swarm ARGS` in this process, on `gdrive`."""
    settings = {"GDRIVE_PATH": str(gdrive), "EXPERIMENT_NAME": "e2e", "TEST_MODE": "True", "PEER_TIMEOUT": "1", **env}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SWARM_URL", raising=False)
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str) -> str:
    """The refusal: exit 2, nothing started (nothing on stdout), one line on stderr."""
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (code, out, err)
    assert err.startswith("rl-swarm: error: ")
    return err.strip().removeprefix("rl-swarm: error: ")


# -- a GDRIVE_PATH a command cannot write to ----------------------------------------------------------------

def bad_drives(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """GDRIVE_PATHs that cannot hold a swarm, and what their line says of each."""
    (tmp_path / "f").write_text("a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    bad = {"a file": (tmp_path / "f", "a file, not a folder"),
           "under a file": (tmp_path / "f" / "drive", f"{tmp_path / 'f'} is a file, not a folder"),
           "a link to nothing": (tmp_path / "dangling", "is a link to nothing")}
    if Path("/proc/self").is_dir():     # no file can be made there, not even by root
        bad["not writable"] = (Path("/proc/self"), "not writable")
    if os.geteuid() != 0:               # root writes a folder of mode 0o500
        (tmp_path / "read-only").mkdir(mode=0o500)
        bad["read-only"] = (tmp_path / "read-only", "not writable (Permission denied)")
    return bad


@pytest.mark.parametrize("command", WRITERS, ids=" ".join)
def test_every_command_that_writes_refuses_a_gdrive_path_it_cannot_use_in_one_line(tmp_path, monkeypatch, capsys,
                                                                                    command):
    bad = bad_drives(tmp_path)
    made = sorted(tmp_path.iterdir())
    for case, (drive, says) in bad.items():
        line = one_line_error(*rl_swarm(monkeypatch, capsys, drive, *command))
        assert line.startswith(f"GDRIVE_PATH={drive}: ") and says in line, (case, line)
        assert "set GDRIVE_PATH to a folder this machine can write" in line
    assert sorted(tmp_path.iterdir()) == made and (tmp_path / "f").is_file()        # nothing made, nothing started


@pytest.mark.parametrize("command, option, fix", [
    (["pack", "--dist"], "--dist", "give --dist a folder this machine can write"),
    (["experiments", "plot", "--out"], "--out's folder", "give --out a path this machine can write")], ids=str)
def test_a_dist_or_out_folder_that_cannot_be_written_is_refused_in_one_line_while_gdrive_path_is_fine(
        tmp_path, monkeypatch, capsys, command, option, fix):
    drive = tmp_path / "drive"
    drive.mkdir()
    for case, (bad, says) in bad_drives(tmp_path).items():
        target = bad / "plot.png" if option == "--out's folder" else bad       # --out names a file in the folder
        line = one_line_error(*rl_swarm(monkeypatch, capsys, drive, *command, str(target)))
        assert line.startswith(f"{option}={bad}: ") and says in line and fix in line, (case, line)
    assert list(drive.iterdir()) == []           # nothing started under GDRIVE_PATH


def test_the_audits_reproduction_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "f").touch()
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], capture_output=True, text=True,
                            env=swarm_env(tmp_path, GDRIVE_PATH=str(tmp_path / "f")), timeout=120)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr == (f"rl-swarm: error: GDRIVE_PATH={tmp_path / 'f'}: a file, not a folder; set GDRIVE_PATH "
                             "to a folder this machine can write (on Colab, under the mounted Drive); a missing one is "
                             "made\n")


def test_the_folders_inside_gdrive_path_are_checked_too(tmp_path, monkeypatch, capsys):
    drive = tmp_path / "drive"
    (drive / "experiments").mkdir(parents=True)
    (drive / "experiments" / "e2e").write_text("not a folder")
    for command in (["up"], ["worker"], ["pretrain"]):
        line = one_line_error(*rl_swarm(monkeypatch, capsys, drive, *command))
        assert line == (f"EXPERIMENT_NAME=e2e: {drive / 'experiments' / 'e2e'} is a file, not a folder; move it away, "
                        "or set another EXPERIMENT_NAME")
    other = tmp_path / "other"
    other.mkdir()
    (other / "experiments").write_text("not a folder")
    line = one_line_error(*rl_swarm(monkeypatch, capsys, other, "up"))
    assert line == f"GDRIVE_PATH={other}: {other / 'experiments'} is a file, not a folder; move it away, or set " \
                   "another GDRIVE_PATH"


def test_a_missing_gdrive_path_is_checked_in_its_parent_and_made_by_the_command_as_before(tmp_path):
    cfg = SwarmConfig(gdrive_path=tmp_path / "new" / "drive")
    check_gdrive_path(cfg, experiment=True)         # its parent could make it: a command refused later made nothing
    assert list(tmp_path.iterdir()) == []           # the write it was tried with left nothing either
    ExperimentFolder(cfg.experiment_dir).create()   # `up`'s first write makes it, parents and all
    assert (cfg.experiment_dir / "state").is_dir()


def test_a_colab_gdrive_path_while_drive_is_not_mounted_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    import swarm_supervisor.preflight as preflight

    content = tmp_path / "content"          # the runtime's own disk, which is writable: Drive is not mounted on it
    monkeypatch.setattr(preflight, "COLAB_DRIVE", content / "drive")
    cfg = SwarmConfig(gdrive_path=content / "drive" / "MyDrive" / "rl-swarm")
    with pytest.raises(ConfigError, match=r"GDRIVE_PATH=.*/content/drive/MyDrive/rl-swarm: Google Drive is not "
                                          r"mounted at .*/content/drive; mount it first"):
        check_gdrive_path(cfg, experiment=True)
    content.mkdir()
    with pytest.raises(ConfigError, match="Google Drive is not mounted"):
        check_gdrive_path(cfg, experiment=True)
    assert list(content.iterdir()) == []


def test_a_url_is_no_gdrive_path():
    with pytest.raises(ConfigError, match=r"GDRIVE_PATH='s3://bucket/team': a URL, not a folder of this machine; an "
                                          r"object store goes in SWARM_URL=s3://bucket/team, and GDRIVE_PATH stays a "
                                          r"local folder"):
        SwarmConfig.from_env({"GDRIVE_PATH": "s3://bucket/team"})
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": "/content/drive/MyDrive/rl-swarm", "SWARM_URL": "gs://bucket/team"})
    assert cfg.gdrive_path == Path("/content/drive/MyDrive/rl-swarm") and cfg.swarm_url == "gs://bucket/team"


# -- reading commands on a wrong folder or name ---------------------------------------------------------------

def drive_with_experiments(tmp_path: Path) -> Path:
    """`real` (a config.json) and `nobody`: the bare folders a joiner of before made while its coordinator never
    came."""
    drive = tmp_path / "drive"
    real = ExperimentFolder(drive / "experiments" / "real").create()
    write_json_atomic(real.config_file, {"schema": 1, "max_rounds": 3})
    ExperimentFolder(drive / "experiments" / "nobody").create()
    return drive


def test_a_listing_of_a_folder_without_experiments_says_where_it_looked(tmp_path, monkeypatch, capsys):
    hint = "(set GDRIVE_PATH to the folder `rl-swarm up` used)"
    missing = tmp_path / "nonexist-drive"
    for action in ("list", "compare", "aggregate", "plot"):
        line = one_line_error(*rl_swarm(monkeypatch, capsys, missing, "experiments", action))
        assert line == f"no experiments under GDRIVE_PATH={missing}, no such folder {hint}"
    assert not missing.exists()
    line = one_line_error(*rl_swarm(monkeypatch, capsys, tmp_path, "experiments", "list"))
    assert line == f"no experiments under GDRIVE_PATH={tmp_path}, which has no experiments/ folder {hint}"
    (tmp_path / "experiments").mkdir()
    code, out, err = rl_swarm(monkeypatch, capsys, tmp_path, "experiments", "list", "--csv")    # nothing there yet
    assert (code, out, err) == (0, "", f"rl-swarm: no experiments under GDRIVE_PATH={tmp_path} {hint}\n")


def test_unknown_and_empty_experiment_names_are_one_line_naming_the_known_ones(tmp_path, monkeypatch, capsys):
    drive = drive_with_experiments(tmp_path)
    for command in (["experiments", "compare", "X"], ["experiments", "aggregate", "X"], ["experiments", "plot", "X"],
                    ["experiments", "compare", "real", "X"]):
        line = one_line_error(*rl_swarm(monkeypatch, capsys, drive, *command))
        assert line == f"no experiment named X under GDRIVE_PATH={drive}: known: real", command
    for command in (["status"], ["validate"]):
        line = one_line_error(*rl_swarm(monkeypatch, capsys, drive, *command, EXPERIMENT_NAME="X"))
        assert line == f"no experiment named X under GDRIVE_PATH={drive}: known: real", command
    line = one_line_error(*rl_swarm(monkeypatch, capsys, drive, "experiments", "compare", "nobody"))
    assert line == (f"experiment nobody under GDRIVE_PATH={drive} is empty: no coordinator ever wrote to it (start it "
                    "with EXPERIMENT_NAME=nobody rl-swarm up); known: real")
    code, out, _ = rl_swarm(monkeypatch, capsys, drive, "experiments", "compare", "real")
    assert code == 0 and "real" in out


def test_a_folder_no_coordinator_wrote_to_is_not_listed_as_an_experiment(tmp_path, monkeypatch, capsys):
    drive = drive_with_experiments(tmp_path)
    code, out, err = rl_swarm(monkeypatch, capsys, drive, "experiments", "list", "--csv")
    assert code == 0 and [line.split(",")[0] for line in out.splitlines()[1:]] == ["real"], out
    assert err == ("rl-swarm: not listed: 1 experiment folder(s) no coordinator ever wrote to (no config, key or "
                   "round): nobody\n")
    cfg = SwarmConfig(gdrive_path=drive)
    assert experiment_roots(cfg) == [drive / "experiments" / "real"]
    warming_up = ExperimentFolder(drive / "experiments" / "warming-up").create()
    node_key(warming_up, COORDINATOR)       # an `up` in its warm-up: its key and lease, no config.json yet
    assert holds_records(warming_up) and not holds_records(ExperimentFolder(drive / "experiments" / "nobody"))


# -- a joiner whose coordinator is not there (yet) -------------------------------------------------------------

def test_a_joiner_says_at_once_which_coordinator_it_waits_for_and_makes_no_folder(tmp_path):
    drive = drive_with_experiments(tmp_path)
    env = swarm_env(tmp_path, GDRIVE_PATH=str(drive), EXPERIMENT_NAME="late", NODE_ID="colab2", NUM_WORKERS="1",
                    PEER_TIMEOUT="3", RL_SWARM_CACHE=os.environ["RL_SWARM_CACHE"])
    joiner = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "worker"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        first = joiner.stdout.readline()
    finally:
        joiner.kill()
        joiner.communicate(timeout=60)
    assert first == (f"rl-swarm: waiting up to 30s for the coordinator of experiment 'late' under GDRIVE_PATH="
                     f"{drive}: start it with `rl-swarm up` and the same GDRIVE_PATH and EXPERIMENT_NAME, before or "
                     "after this (no such experiment there yet; known: real)\n")
    assert sorted(p.name for p in (drive / "experiments").iterdir()) == ["nobody", "real"]


def test_a_joiner_started_before_its_coordinator_joins_once_it_comes(tmp_path, capsys, monkeypatch):
    cfg = SwarmConfig(gdrive_path=tmp_path / "drive", experiment_name="late", cache_dir=tmp_path / "cache",
                      peer_timeout=1.0)
    folder = ExperimentFolder(cfg.experiment_dir)
    monkeypatch.setattr(join, "JOIN_POLL_S", 0.05)
    monkeypatch.setattr(join, "COORDINATOR_PATIENCE", 1)
    with pytest.raises(SwarmError, match=r"^gave up after 1s waiting for the coordinator of experiment 'late' under "
                                         r"GDRIVE_PATH=.*: start it with `rl-swarm up`"):
        join_when_ready(cfg, folder)
    assert not cfg.gdrive_path.exists()         # it looked, and wrote nothing
    monkeypatch.setattr(join, "COORDINATOR_PATIENCE", 60)
    capsys.readouterr()
    joined = []
    joining = threading.Thread(target=lambda: joined.append(join_when_ready(cfg, folder)))
    joining.start()
    deadline = time.monotonic() + 30
    while "waiting up to 60s for the coordinator of experiment 'late'" not in capsys.readouterr().out:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ExperimentFolder(cfg.experiment_dir).create()         # the coordinator's `up` comes: its folder, key and base
    coordinator = node_key(folder, COORDINATOR)
    folder.base_dir.mkdir()
    write_json_atomic(folder.base_dir / "meta.json", sign_base_meta({"model_name": "m"}, "0" * 64, coordinator))
    with coordinators_up(folder, cfg).held() as up:
        write_recorded_config(folder, Resume().record(cfg, "m", "cpu", up.lease.instance), coordinator)
        joining.join(timeout=30)
    assert joined and f"coordinator key {coordinator.fingerprint} (pinned on this machine" in capsys.readouterr().out
    assert folder.create() is folder


def test_a_joiner_of_a_finished_experiment_is_refused_before_it_writes_there(tmp_path, monkeypatch, capsys):
    """The write check made and removed a probe file in the finished experiment's folder before the refusal."""
    drive = tmp_path / "drive"
    folder = ExperimentFolder(drive / "experiments" / "e2e").create()
    write_as(folder, COORDINATOR, folder.finished_file, SwarmFinished(rounds=40, finished_at=time.time()).to_json())
    before = entries_of(folder.root)
    for command in ("worker", "join"):
        assert one_line_error(*rl_swarm(monkeypatch, capsys, drive, command)) == (
            "experiment 'e2e' already finished its 40 rounds; its `rl-swarm up` continues it with a raised MAX_ROUNDS "
            "(join then), or set a new EXPERIMENT_NAME")
    assert entries_of(folder.root) == before
