"""`rl-swarm sapo-table`: the paper's four splits side by side, and the table the paper prints."""

import hashlib
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from configs_env import ConfigError, SwarmConfig, SwarmError
from configs_env.presets import PAPER_TASKS
from swarm_supervisor.cli import EXIT_USAGE, main
from swarm_supervisor.sapo_table import warmup_accuracies, weak_base_warning
from swarm_supervisor.claim import coordinator_key
from swarm_supervisor.table import Arm, copy_base
from swarm_supervisor.table_report import TableRow, format_table, gains
from tests.helpers import swarm_env
from workers.shared_folder.base_meta import sign_base_meta
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.hostile import forger
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.signing import KeyRing


def test_the_paper_presets_are_the_papers_swarm_and_a_degenerate_split_is_named():
    cfg = SwarmConfig.from_env({"PRESET": "paper-2-6"})
    assert (cfg.num_workers, cfg.num_generations, cfg.num_train_samples, cfg.num_transplant_trees) == (8, 8, 2, 6)
    assert cfg.tasks == PAPER_TASKS and len(cfg.tasks) == 9 and cfg.kl_beta == 0 and not cfg.warnings()
    # with 4 workers, J=3 of I=1 takes every group the other three publish: every worker trains on the same data
    [warning] = SwarmConfig.from_env({"PRESET": "sapo-1-3"}).warnings()
    assert "all 4 workers train on the same groups" in warning and "NUM_WORKERS=5" in warning
    assert not SwarmConfig.from_env({"PRESET": "sapo-1-3", "NUM_WORKERS": "5"}).warnings()
    with pytest.raises(ConfigError, match="SEEDS='1,1'"):
        SwarmConfig.from_env({"SEEDS": "1,1"})


def test_gains_are_taken_seed_by_seed_against_the_no_sharing_split():
    def row(label: str, seeds: tuple[int, ...], rewards: tuple[float, ...]) -> TableRow:
        return TableRow(label=label, experiments=(), seeds=seeds, rounds=(100,) * len(seeds),
                        rounds_reached=(100,) * len(seeds),
                        cumulative_reward=rewards, held_out_start=(0.5,) * len(seeds),
                        held_out_end=(0.6,) * len(seeds), task_rewards={}, reward_per_round=())

    alone, shared = row("8/0", (1, 2, 3), (50.0, 100.0, 80.0)), row("4/4", (1, 2, 3), (75.0, 110.0, 80.0))
    assert gains(shared, alone) == pytest.approx([0.5, 0.1, 0.0])
    text = format_table([alone, shared], {"8/0": 561.8, "4/4": 1093.3})
    [line] = [line for line in text.splitlines() if line.startswith("4/4")]
    assert "88.3 ± " in line and "+20.0% ± " in line and "1093.3 (4/4)" in line and "+95%" in line


def test_arms_of_one_seed_differ_only_in_their_preset():
    arm = Arm(label="6/2", seed=2, experiment="t-paper-6-2-s2", env=(("PRESET", "paper-6-2"),))
    env = arm.environment({"SEED": "9", "EXPERIMENT_NAME": "x", "GDRIVE_PATH": "/d"})
    assert (env["SEED"], env["EXPERIMENT_NAME"], env["PRESET"], env["GDRIVE_PATH"]) == \
        ("2", "t-paper-6-2-s2", "paper-6-2", "/d")


def signed_base(cfg: SwarmConfig, meta: dict, weights: bytes = b"weights") -> ExperimentFolder:
    """A base in cfg's experiment, its meta.json signed by the experiment's coordinator (this machine's key,
    published as `up` publishes it)."""
    folder = ExperimentFolder(cfg.experiment_dir).create()
    key, keyring = coordinator_key(cfg, folder)
    keyring.publish(key)
    folder.base_dir.mkdir()
    (folder.base_dir / "model.safetensors").write_bytes(weights)
    (folder.base_dir / "meta.json").write_text(json.dumps(sign_base_meta(meta, hashlib.sha256(weights).hexdigest(),
                                                                         key)))
    return folder


def test_the_swarms_a_table_runs_at_once_are_fitted_on_the_gpus_together(tmp_path, capsys):
    """Four paper swarms at once are 32 workers: checked together (each `up` alone would see the GPUs empty, and
    puts its workers from cuda:0 on). Where the update's CUDA graphs do not fit for all of them, every swarm runs
    its update eagerly; where even that does not fit, the table is refused with the --parallel that fits."""
    from configs_env.presets import TABLE_FAMILIES
    from swarm_supervisor.devices import nvml_ids
    from swarm_supervisor.monitor import Monitor
    from swarm_supervisor.sapo_table import settle_table_fit
    from tests.helpers import StandInNVML

    gib = 1024.0
    arms = [Arm(label=p, seed=1, experiment=f"t-{p}", env=(("PRESET", p),)) for p in TABLE_FAMILIES["paper"]]

    def need_of(settings: SwarmConfig) -> float:          # paper-4-4's worker as measured, with and without
        return 3.5 * gib + (0.85 * gib if settings.graphed_update else 0.0)

    def gpus(*free_gib: float) -> Monitor:
        ids = nvml_ids([f"cuda:{i}" for i in range(len(free_gib))], None)
        return Monitor(ids, nvml=StandInNVML([(140 * gib, (140 - free) * gib, {}) for free in free_gib]))

    env = {"GDRIVE_PATH": str(tmp_path)}
    assert settle_table_fit(arms, env, 4, 1, need_of, gpus(139))["UPDATE_GRAPHS"] == "off"
    assert "cuda:0: 32 workers, ~3.5 GiB each" in capsys.readouterr().out
    assert settle_table_fit(arms, env, 2, 1, need_of, gpus(139)) == env       # 16 workers: room for the graphs
    # three GPUs: each swarm of 8 puts 3 workers on cuda:0 and cuda:1 and 2 on cuda:2, so cuda:0 holds 12, not 11
    spread = {**env, "DEVICE": "auto"}
    with pytest.raises(SwarmError, match=r"4 swarms at once put 12 workers on cuda:0, .*run `rl-swarm sapo-table "
                                         r"--parallel 3`"):
        settle_table_fit(arms, spread, 4, 3, need_of, gpus(44, 80, 80))


def test_a_base_that_answers_too_few_questions_is_named_with_the_fix(tmp_path):
    env = {"GDRIVE_PATH": str(tmp_path), "EXPERIMENT_NAME": "x", "HF_HUB_OFFLINE": "1",
           "RL_SWARM_CACHE": str(tmp_path / "cache")}
    arms = [Arm(label=label, seed=seed, experiment=f"x-{preset}-s{seed}", env=(("PRESET", preset),))
            for seed in (1, 2) for label, preset in (("8/0", "paper-8-0"), ("4/4", "paper-4-4"))]
    for seed, accuracy in ((1, 0.06), (2, 0.84)):       # seed 2's base only in its second arm: found there too
        signed_base(arms[2 * (seed - 1) + (seed == 2)].config(env), {"greedy_accuracy_after": accuracy})
    # a peer's meta.json in seed 1's second arm, claiming a strong base, hides nothing
    planted = ExperimentFolder(arms[1].config(env).experiment_dir).base_dir
    planted.mkdir(parents=True)
    (planted / "meta.json").write_text(json.dumps({"schema": 1, "greedy_accuracy_after": 0.99}))
    arms = [arms[1], arms[0], *arms[2:]]
    accuracies = warmup_accuracies(arms, env)
    assert accuracies == {1: 0.06, 2: 0.84}
    warning = weak_base_warning(accuracies)
    assert "6.0% (seed 1)" in warning and "seed 2" not in warning
    assert "WARMUP_STEPS" in warning and "TASKS=" in warning
    assert weak_base_warning({2: 0.84}) is None
    assert "19.6% (seed 3)" in weak_base_warning({3: 0.196})      # not "20% ... below 20%"


def test_a_base_the_table_copies_is_signed_for_the_split_it_lands_in_and_a_planted_one_is_not_spread(tmp_path):
    """Each split is an experiment of its own, with a coordinator key of its own: a copy still signed by the first
    split's coordinator would be refused by every other split's workers; and a base a peer planted in the first
    split must not become every split's start."""
    from workers.learning.model import load_policy
    from workers.warmup import WarmupReport, load_base, save_base

    first, other = (SwarmConfig(gdrive_path=tmp_path / "drive", experiment_name=name, cache_dir=tmp_path / "cache")
                    for name in ("t-paper-8-0-s1", "t-paper-4-4-s1"))
    source, target = ExperimentFolder(first.experiment_dir).create(), ExperimentFolder(other.experiment_dir).create()
    warmed = load_policy("rl-swarm/tiny-gpt2", "cpu", tmp_path / "cache")
    key, keyring = coordinator_key(first, source)
    keyring.publish(key)
    save_base(source.root, warmed, WarmupReport(warmed.name, 1, 2.5, 0.0, 0.9, 1.0), key)
    copy_base(first, other)
    target_key, target_ring = coordinator_key(other, target)       # made by the copy; the split's `up` publishes it
    target_ring.publish(target_key)
    worker = load_policy("rl-swarm/tiny-gpt2", "cpu", tmp_path / "cache")
    with torch.no_grad():
        next(worker.model.parameters()).add_(1.0)
    assert load_base(target.root, worker, KeyRing(target), unsigned_ok=False)      # as the split's workers check it
    assert torch.equal(next(worker.model.parameters()), next(warmed.model.parameters()))
    with pytest.raises(RejectedFile, match="not the experiment's coordinator's"):   # not the first split's any more
        load_base(target.root, worker, KeyRing(source), unsigned_ok=False)
    # a base a peer planted in the first split is not copied
    shutil.rmtree(target.base_dir)
    save_base(source.root, warmed, WarmupReport(warmed.name, 1, 2.5, 0.0, 1.0, 1.0), forger())
    with pytest.raises(RejectedFile, match="not the experiment's coordinator's"):
        copy_base(first, other)
    assert not target.base_dir.exists() and not [p for p in target.root.iterdir() if p.name.startswith(".base")]


@pytest.mark.slow
def test_test_mode_sapo_table_runs_four_splits_on_the_cpu_prints_the_papers_table_and_the_notebook_shows_it(
        tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    from tests.notebook_runs import execute, outputs_text
    # TEST_MODE sizes the table for a CPU itself (4 workers a swarm, warm-up batches and held-out sets of 8: the
    # paper's nine tasks have prompts of up to ~370 tokens). The name is the one the sapo_configs notebook gives a
    # TEST_SIZED table, so the notebook finds these swarms
    env = swarm_env(tmp_path, MAX_ROUNDS="2", EXPERIMENT_NAME="sapo-configs-test")
    for name in ("WARMUP_BATCH_SIZE", "EVAL_SIZE", "NUM_WORKERS"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "sapo-table"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # the 4-worker shape is TEST_MODE's choice: said once as such, not as a fault of 2/6's settings
    assert "rl-swarm: TEST_MODE runs paper swarms of 4 workers where the paper ran 8" in result.stdout
    assert "2/6: NUM_TRANSPLANT_TREES" not in result.stdout
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("split"))
    rows = lines[header + 2:header + 6]
    assert [r.split()[0] for r in rows] == ["8/0", "6/2", "4/4", "2/6"]
    assert "561.8 (8/0)" in rows[0] and "+94%" not in rows[0] and "1093.3 (4/4)" in rows[2]
    for split in ("8/0", "6/2", "4/4", "2/6"):          # each swarm's start and end, as they come
        assert f"rl-swarm: sapo-table: {split} (seed 1) started: sapo-configs-test-paper-" in result.stdout
        assert f"rl-swarm: sapo-table: {split} (seed 1) finished at round 2" in result.stdout
    drive = tmp_path / "drive"
    name = "sapo-configs-test-paper"
    table = json.loads((drive / "tables" / f"{name}.json").read_text())
    assert [r["split"] for r in table["rows"]] == ["8/0", "6/2", "4/4", "2/6"]
    assert all(r["rounds"] == [2] and len(r["task_rewards"]) >= 1 for r in table["rows"])
    base_meta = json.loads((drive / "experiments" / f"{name}-8-0-s1" / "base" / "meta.json").read_text())
    assert table["warmup_accuracy"] == {"1": base_meta["greedy_accuracy_after"]}
    # one warm-up for the seed: every split started from the same base
    bases = [(drive / "experiments" / f"{name}-{s}-s1" / "base" / "model.safetensors").read_bytes()
             for s in ("8-0", "6-2", "4-4", "2-6")]
    assert all(b == bases[0] for b in bases)
    # the splits really differ in sharing: 8/0 trains on no peer group, 2/6 on some
    def external(split: str) -> int:
        path = drive / "experiments" / f"{name}-{split}-s1" / "metrics" / "worker-1" / "metrics.jsonl"
        return sum(json.loads(line)["external_groups"] for line in path.read_text().splitlines())
    assert external("8-0") == 0 and external("2-6") > 0
    # it resumes like `up`: the notebook's cell, with the paper family picked in its form, runs `rl-swarm sapo-table`
    # again; it finds every split finished (starting no swarm), shows the same table and its plot
    logs = {path: path.read_bytes() for path in (drive / "tables" / "logs").glob("*.log")}
    (drive / "tables" / f"{name}.png").unlink()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = execute("sapo_configs", tmp_path, params={"FAMILY": '"paper"'})
    assert rows[0] in outputs_text(notebook)
    assert any("image/png" in out.get("data", {}) for out in notebook.cells[0].outputs)
    assert (drive / "tables" / f"{name}.png").exists()
    assert {path: path.read_bytes() for path in logs} == logs      # no swarm's `up` ran (each appends to its log)
    # a table stopped early (here: 8/0's round 2 gone) compares every split over the rounds all reached
    for path in (drive / "experiments" / f"{name}-8-0-s1" / "metrics").glob("*/metrics.jsonl"):
        path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                                if json.loads(line)["round"] == 1))
    report = subprocess.run([sys.executable, "-m", "swarm_supervisor", "sapo-table", "--report"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "seed 1: compared over the first 1 rounds, the most every split reached (8/0 1, 6/2 2, 4/4 2, 2/6 2)" \
        in report.stdout
    assert {path: path.read_bytes() for path in logs} == logs
    cut = json.loads((drive / "tables" / f"{name}.json").read_text())["rows"]
    assert [(r["rounds"], r["rounds_reached"]) for r in cut] == [([1], [1])] + [([1], [2])] * 3
    first = [json.loads(line) for path in (drive / "experiments" / f"{name}-2-6-s1" / "metrics").glob("*/metrics.jsonl")
             for line in path.read_text().splitlines() if json.loads(line)["round"] == 1]
    assert cut[3]["cumulative_reward"] == [pytest.approx(sum(m["reward_mean"] for m in first) / len(first), abs=1e-4)]


def test_a_report_of_a_table_never_run_names_the_folder_and_the_fix(tmp_path, monkeypatch, capsys):
    for key, value in swarm_env(tmp_path, EXPERIMENT_NAME="nothing").items():
        monkeypatch.setenv(key, value)
    assert main(["sapo-table", "--report"]) == EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert error.startswith("rl-swarm: error: sapo-table --report: no swarm has run for nothing-paper-8-0-s1")
    assert str(tmp_path / "drive" / "experiments") in error and "run `rl-swarm sapo-table`" in error
    assert "\n" not in error and not (tmp_path / "drive" / "tables").exists()
    assert main(["sapo-table", "--parallel", "0"]) == EXIT_USAGE       # a notebook form's 0, say
    assert capsys.readouterr().err.strip() == ("rl-swarm: error: sapo-table --parallel 0: at least one swarm runs at "
                                               "a time (e.g. --parallel 2)")


def test_a_tables_swarms_stop_as_on_ctrl_c_when_the_table_is_killed_with_sigkill(tmp_path):
    """`kill -9` of `rl-swarm sapo-table`: each swarm it started (in a session of its own, so no terminal's signal
    reaches it) gets the SIGINT of a Ctrl-C and stops, instead of running on with nobody left to stop it."""
    from tests.helpers import wait_for

    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    # a stand-in for the arm's `up`: waits for SIGINT, then says so (the table starts its arms exactly like this)
    swarm = ("import os, pathlib, signal, time\n"
             "def stop(*_):\n"
             f"    pathlib.Path({str(stopped)!r}).write_text('x')\n"
             "    os._exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             f"pathlib.Path({str(ready)!r}).write_text('x')\n"
             "time.sleep(120)\n")
    table = ("import subprocess, sys, time\n"
             "from swarm_supervisor.hangup import session_of_its_own\n"
             f"subprocess.Popen([sys.executable, '-c', {swarm!r}], **session_of_its_own())\n"
             "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", table], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(ready.exists, 60, "the swarm to start", proc)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not stopped.exists():
            assert time.monotonic() < deadline, "the table's swarm ran on after the table was killed"
            time.sleep(0.1)
    finally:
        proc.kill()


def test_a_notebook_runs_a_table_unbuffered_and_its_stop_button_gives_the_swarms_the_time_the_table_does(
        tmp_path, monkeypatch):
    """The sapo_configs cell prints the table's lines as they come (a child printing into a pipe buffers by the
    block: they would come at the end, hours later), and its stop button sends the table a Ctrl-C, then waits
    longer than sapo-table gives its swarms to save before it kills them all."""
    from swarm_supervisor import notebook
    from swarm_supervisor.table import STOP_GRACE_S

    started = {}

    class Started:
        def __init__(self, argv: list[str], env: dict[str, str], stop_wait_s: float):
            started.update(argv=argv, env=env, stop_wait_s=stop_wait_s)

        def follow(self, table, cell) -> int:  # noqa: ANN001 - the cell's table and output, unused here
            started["table"] = table
            return 0

    monkeypatch.setattr(notebook, "Child", Started)
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    assert notebook.run_swarm("sapo-table", "--family", "sapo", GDRIVE_PATH=str(tmp_path)) == 0
    assert started["argv"][-4:] == ["swarm_supervisor", "sapo-table", "--family", "sapo"]
    assert started["env"]["PYTHONUNBUFFERED"] == "1" and started["table"] is None
    assert started["stop_wait_s"] > STOP_GRACE_S
