"""The supervised warm-up runs WARMUP_STEPS steps, or stops early once WARMUP_TARGET_ACCURACY is reached."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs_env import ConfigError, SwarmConfig
from tests.helpers import node_key, swarm_env
from workers.learning.model import Policy, load_policy
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.hostile import forger
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey
from workers.warmup import (TARGET_CHECK_EVERY, WarmupReport, _supervised_step, load_base, save_base,
                            supervised_warmup)
from workers.learning.tasks import TaskMix


def fresh_policy(cache: Path) -> Policy:
    return load_policy("rl-swarm/tiny-gpt2", "cpu", cache)


def config(**env: str) -> SwarmConfig:
    return SwarmConfig.from_env({"TEST_MODE": "true", **env})


def report(policy: Policy) -> WarmupReport:
    return WarmupReport(policy.name, 1, 2.5, 0.0, 0.0, 1.0)


def coordinator(root: Path) -> tuple[NodeKey, KeyRing]:
    """The experiment's coordinator key, published in its folder, and a worker's key ring, which trusts it."""
    folder = ExperimentFolder(root)
    return node_key(folder, COORDINATOR), KeyRing(folder)


def test_a_low_target_stops_at_the_first_check_that_reaches_it_and_changes_no_step(model_cache):
    policy = fresh_policy(model_cache)
    checks = []
    report = supervised_warmup(policy, config(WARMUP_STEPS="400", WARMUP_TARGET_ACCURACY="0.05"),
                               on_check=lambda step, accuracy: checks.append((step, accuracy)))
    assert report.stopped_by == "target" and report.steps < 400
    assert report.steps % TARGET_CHECK_EVERY == 0 and checks[-1] == (report.steps, report.greedy_accuracy_after)
    assert report.greedy_accuracy_after >= 0.05 > max([report.greedy_accuracy_before] + [a for _, a in checks[:-1]])
    assert report.stop_note() == f", target 5% reached at step {report.steps}"
    assert list(report.checks) == checks    # the curve is kept with the base, not only shown on the bar

    # the checks do not disturb training: the same number of steps without a target gives the same weights
    same_steps = fresh_policy(model_cache)
    plain = supervised_warmup(same_steps, config(WARMUP_STEPS=str(report.steps)))
    assert plain.steps == report.steps and plain.greedy_accuracy_after == report.greedy_accuracy_after
    for a, b in zip(policy.model.state_dict().values(), same_steps.model.state_dict().values()):
        assert torch.equal(a, b)


def test_target_zero_runs_the_whole_step_budget_without_checks(model_cache):
    checks = []
    report = supervised_warmup(fresh_policy(model_cache), config(WARMUP_STEPS="60"),
                               on_check=lambda *c: checks.append(c))
    assert (report.steps, report.stopped_by, report.stop_note(), checks) == (60, "steps", "", [])


def test_an_unreachable_target_spends_the_budget_and_says_so(model_cache):
    checks = []
    report = supervised_warmup(fresh_policy(model_cache), config(WARMUP_STEPS="60", WARMUP_TARGET_ACCURACY="1"),
                               on_check=lambda step, _: checks.append(step))
    assert (report.steps, report.stopped_by, checks) == (60, "steps", [50])
    assert report.stop_note() == ", target 100% not reached: all 60 WARMUP_STEPS spent"


@pytest.mark.parametrize("env, message", [
    ({"WARMUP_TARGET_ACCURACY": "1.5"},
     "WARMUP_TARGET_ACCURACY='1.5': expected a number >= 0 and <= 1 (e.g. WARMUP_TARGET_ACCURACY=0.3)"),
    ({"WARMUP_TARGET_ACCURACY": "0.3", "WARMUP_STEPS": "0"},
     "WARMUP_TARGET_ACCURACY=0.3 with WARMUP_STEPS=0: the warm-up is off; set WARMUP_STEPS to the most steps it "
     "may take (e.g. WARMUP_STEPS=400)"),
])
def test_a_bad_target_is_one_line_naming_the_fix(env, message):
    with pytest.raises(ConfigError) as error:
        SwarmConfig.from_env(env)
    assert str(error.value) == message


@pytest.mark.slow
def test_pretrain_says_the_target_stopped_the_warm_up(tmp_path):
    env = swarm_env(tmp_path, WARMUP_STEPS="400", WARMUP_TARGET_ACCURACY="0.05")
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "pretrain"], capture_output=True, text=True,
                            env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "target 5% reached at step" in result.stdout
    # the curve and the per-task result, for a user choosing WARMUP_STEPS for many tasks
    assert "rl-swarm: checks (step: accuracy): 50: " in result.stdout
    assert "rl-swarm: by task: " in result.stdout and "basic_arithmetic " in result.stdout


def test_a_step_whose_gradient_is_not_finite_leaves_the_weights_as_they_were(model_cache):
    """One bad batch (a NaN anywhere in the gradient) must not reach the weights every worker will start from."""
    policy = fresh_policy(model_cache)
    cfg = config()
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in policy.model.parameters()]
    hook = policy.model.get_input_embeddings().weight.register_hook(lambda grad: grad * float("nan"))
    loss, stepped = _supervised_step(policy, TaskMix(cfg.tasks, seed=1).sample(4, random.Random(1)), optimizer,
                                     cfg.max_new_tokens)
    hook.remove()
    assert torch.isfinite(loss) and not stepped
    assert all(torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))


def test_a_diverging_warm_up_stops_the_swarm_before_it_starts_and_saves_no_base(tmp_path):
    """A learning rate the model cannot take: one line naming WARMUP_LR, and no NaN base for the workers to
    start from (on a GPU such a base ran a whole SAPO table at reward 0 without an error anywhere)."""
    env = swarm_env(tmp_path, WARMUP_LR="1e30")
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], capture_output=True, text=True,
                            env=env, timeout=180)
    assert result.returncode != 0
    error = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "diverged" in line]
    assert error == ["rl-swarm: error: warm-up failed: the warm-up of rl-swarm/tiny-gpt2 diverged: its gradient "
                     "was not finite in 10 of 11 steps (WARMUP_LR=1e+30); nothing was saved: set a lower "
                     "WARMUP_LR, or WARMUP_STEPS=0 to start from the model as it is"], result.stderr
    experiment = tmp_path / "drive" / "experiments" / "e2e"
    assert not (experiment / "base").exists() and not list((experiment / "state").glob("round_*"))


def test_a_base_whose_weights_are_not_finite_is_refused_with_the_fix(model_cache, tmp_path):
    policy = fresh_policy(model_cache)
    with torch.no_grad():
        next(policy.model.parameters())[0, 0] = float("nan")
    key, keyring = coordinator(tmp_path)
    save_base(tmp_path, policy, report(policy), key)
    with pytest.raises(RejectedFile) as error:
        load_base(tmp_path, fresh_policy(model_cache), keyring, unsigned_ok=False)
    assert str(error.value) == (f"{tmp_path / 'base'} holds weights that are not finite (a warm-up that diverged): "
                                "delete that folder to warm up again, with a lower WARMUP_LR")


def test_a_base_whose_meta_cannot_be_read_is_refused_not_trained_past(model_cache, tmp_path):
    """The SAPO table's failure: a meta.json with a NaN in it was skipped, and every worker started from the raw
    model beside a base it never loaded."""
    policy = fresh_policy(model_cache)
    key, keyring = coordinator(tmp_path)
    base = save_base(tmp_path, policy, report(policy), key)
    (base / "meta.json").write_text('{"schema": 1, "model_name": "rl-swarm/tiny-gpt2", "final_loss": NaN}')
    with pytest.raises(RejectedFile) as error:
        load_base(tmp_path, fresh_policy(model_cache), keyring, unsigned_ok=True)
    assert str(error.value).startswith(f"{base}: its meta.json cannot be read (")
    assert str(error.value).endswith(f"); not loaded: delete {base} to warm up again, or use a new EXPERIMENT_NAME")
    assert not load_base(tmp_path / "no-base-yet", fresh_policy(model_cache), keyring, unsigned_ok=False)


def test_a_base_whose_weights_a_power_cut_emptied_is_refused_with_the_fix(model_cache, tmp_path):
    """meta.json whole beside an empty weights file: every worker would crash on a raw safetensors error."""
    policy = fresh_policy(model_cache)
    key, keyring = coordinator(tmp_path)
    base = save_base(tmp_path, policy, report(policy), key)
    (base / "model.safetensors").write_bytes(b"")
    with pytest.raises(RejectedFile) as error:
        load_base(tmp_path, fresh_policy(model_cache), keyring, unsigned_ok=False)
    assert str(error.value).startswith(f"{base / 'model.safetensors'} cannot be loaded (")
    assert str(error.value).endswith(f"): delete {base} to warm up again, or use a new EXPERIMENT_NAME")
    assert "\n" not in str(error.value)


def peers_policy(cache: Path) -> Policy:
    """Weights a peer chose, all 0.5: what it would have every new worker start from."""
    policy = fresh_policy(cache)
    with torch.no_grad():
        for parameter in policy.model.parameters():
            parameter.fill_(0.5)
    return policy


def starts_from_peers_weights(policy: Policy) -> bool:
    return all(bool((parameter == 0.5).all()) for parameter in policy.model.parameters())


def test_a_base_a_peer_planted_is_no_new_workers_start(model_cache, tmp_path):
    """base/ is in the shared folder: a peer's own base (unsigned, signed by its key, or the coordinator's
    meta.json beside the peer's weights) is refused in one line naming the folder and the fix, never loaded."""
    key, keyring = coordinator(tmp_path)
    peers = peers_policy(model_cache)
    peers_weights = save_base(tmp_path / "peer", peers, report(peers), forger()) / "model.safetensors"

    def plant(kind: str) -> None:
        shutil.rmtree(tmp_path / "base", ignore_errors=True)
        if kind == "the peer's weights":        # beside the coordinator's own meta.json
            honest = fresh_policy(model_cache)
            save_base(tmp_path, honest, report(honest), key)
        else:
            shutil.copytree(peers_weights.parent, tmp_path / "base")
        if kind == "unsigned":
            (tmp_path / "base" / "meta.json").write_text(json.dumps({"schema": 1, "model_name": peers.name}))
        shutil.copyfile(peers_weights, tmp_path / "base" / "model.safetensors")

    reasons = {"unsigned": "its meta.json is not signed by the experiment's coordinator (a peer's, or made by an "
                           "rl-swarm before signed bases); not loaded",
               "signed by the peer": "its meta.json is not the experiment's coordinator's (its signature is not "
                                     "'coordinator''s (key ",
               "the peer's weights": "not the file its signed meta.json names (SHA-256 differs)"}
    for kind, reason in reasons.items():
        plant(kind)
        worker = fresh_policy(model_cache)
        with pytest.raises(RejectedFile) as error:
            load_base(tmp_path, worker, keyring, unsigned_ok=False)
        assert reason in str(error.value) and str(error.value).startswith(str(tmp_path / "base")), kind
        assert str(error.value).endswith(f"delete {tmp_path / 'base'} to warm up again, or use a new "
                                         "EXPERIMENT_NAME") and "\n" not in str(error.value)
        assert not starts_from_peers_weights(worker), kind
    # the coordinator's own base is every worker's start
    warmed = fresh_policy(model_cache)
    with torch.no_grad():
        next(warmed.model.parameters()).add_(1.0)
    save_base(tmp_path, warmed, report(warmed), key)
    worker = fresh_policy(model_cache)
    assert load_base(tmp_path, worker, keyring, unsigned_ok=False)
    assert torch.equal(next(worker.model.parameters()), next(warmed.model.parameters()))


def test_a_base_from_before_signed_bases_is_taken_only_by_a_node_whose_key_is_as_old(model_cache, tmp_path):
    """An experiment upgraded mid-run keeps its unsigned base for its nodes from before signed files (a restarted
    worker's KL anchor, say); a node whose key signs its files takes it for a peer's."""
    key, keyring = coordinator(tmp_path)
    warmed = peers_policy(model_cache)
    base = save_base(tmp_path, warmed, report(warmed), key)
    (base / "meta.json").write_text(json.dumps({"schema": 1, "model_name": warmed.name}))     # as it was
    with pytest.raises(RejectedFile, match="not signed by the experiment's coordinator"):
        load_base(tmp_path, fresh_policy(model_cache), keyring, unsigned_ok=False)
    worker = fresh_policy(model_cache)
    assert load_base(tmp_path, worker, keyring, unsigned_ok=True) and starts_from_peers_weights(worker)


@pytest.mark.slow
def test_the_coordinator_warms_up_over_a_base_a_peer_planted_before_the_swarm_started(model_cache, tmp_path):
    env = swarm_env(tmp_path, WARMUP_STEPS="10")
    exp = tmp_path / "drive" / "experiments" / "e2e"
    peers = peers_policy(model_cache)
    save_base(exp, peers, report(peers), forger())
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "pretrain"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"rl-swarm: {exp / 'base'}: its meta.json is not the experiment's coordinator's (its signature is not "
            "'coordinator''s") in result.stdout and "a new one is warmed up in its place" in result.stdout
    worker = fresh_policy(model_cache)
    pinned = KeyRing(ExperimentFolder(exp))                         # the coordinator's key, as its workers pin it
    assert load_base(exp, worker, pinned, unsigned_ok=False) and not starts_from_peers_weights(worker)
