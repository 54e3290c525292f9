"""Several swarms side by side on one machine: the SAPO table's splits, or a bench's learning-rate sweep.

Each swarm (an `Arm`) is a plain `rl-swarm up` in a process of its own, with its own EXPERIMENT_NAME in the
same GDRIVE_PATH, so it resumes, shows in `status` and `experiments` and validates like any other. The
arms of one seed share one warm-up: it runs once (`rl-swarm pretrain`) and its base is copied into the other
arms' folders, so the splits differ in how they share rollouts and in nothing else.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from configs_env import SwarmConfig, SwarmError
from swarm_supervisor.hangup import on_hangup, print_nowhere, session_of_its_own, terminal_outputs
from workers.shared_folder.exchange import read_finished
from workers.shared_folder.folder import ExperimentFolder
from swarm_supervisor.claim import coordinator_key
from workers.shared_folder.base_meta import BASE_WEIGHTS, signed_base_meta
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.signing import KeyRing, file_sha256, local_key_dir
from workers.shared_folder.leftovers import make_temp_dir, remove
from workers.shared_folder.safe_io import copy_regular_files, sync_folder, write_atomic

POLL_S = 1.0
STOP_GRACE_S = 90.0
# a line of each running swarm's round this often: the swarms' own output goes to their logs, and a notebook's
# cell shows nothing else for the hours a table runs
PROGRESS_S = 300.0
WARMUP_TIMEOUT_S = 2 * 3600.0       # a stopping swarm saves a checkpoint per worker; then it is killed
# the settings a warm-up depends on: arms of one seed share a base only when these agree
WARMUP_KEYS = ("model_name", "tasks", "seed", "warmup_steps", "warmup_batch_size", "warmup_lr",
               "warmup_target_accuracy", "max_new_tokens", "eval_size", "cache_dir", "device")


@dataclass(frozen=True)
class Arm:
    """One swarm of a table: its row's label, its seed, and the variables of its `rl-swarm up`."""

    label: str
    seed: int
    experiment: str
    env: tuple[tuple[str, str], ...]     # set over the caller's environment

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        return {**base, **dict(self.env), "SEED": str(self.seed), "EXPERIMENT_NAME": self.experiment}

    def config(self, base: Mapping[str, str]) -> SwarmConfig:
        return SwarmConfig.from_env(self.environment(base))


def _command(action: str) -> list[str]:
    return [sys.executable, "-m", "swarm_supervisor", action]


def share_warmups(arms: list[Arm], base_env: Mapping[str, str], log_dir: Path) -> None:
    """One `rl-swarm pretrain` per seed (the seeds' at once), its base copied to the seed's other arms whose
    warm-up would be the same."""
    by_seed: dict[int, list[Arm]] = {}
    for arm in arms:
        by_seed.setdefault(arm.seed, []).append(arm)
    firsts = {seed: members[0].config(base_env) for seed, members in by_seed.items()}
    running = {}
    for seed, members in sorted(by_seed.items()):
        if firsts[seed].warmup_steps and not (ExperimentFolder(firsts[seed].experiment_dir).base_dir
                                              / "meta.json").exists():
            log = log_dir / f"pretrain-{members[0].experiment}.log"
            with open(log, "ab") as out:
                running[seed] = (log, subprocess.Popen(_command("pretrain"), env=members[0].environment(base_env),
                                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    try:
        for seed, (log, process) in running.items():
            try:
                code = process.wait(timeout=WARMUP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise SwarmError(f"the warm-up of seed {seed} took over {WARMUP_TIMEOUT_S:.0f}s and was stopped: "
                                 f"see {log}") from None
            if code != 0:
                raise SwarmError(f"the warm-up of seed {seed} failed (exit {code}): see {log}")
    finally:
        for _, process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    for seed, members in by_seed.items():
        first = firsts[seed]
        for arm in members[1:]:
            cfg = arm.config(base_env)
            target = ExperimentFolder(cfg.experiment_dir).base_dir
            same = all(getattr(cfg, key) == getattr(first, key) for key in WARMUP_KEYS)
            if first.warmup_steps and same and not target.exists() \
                    and not ExperimentFolder(cfg.experiment_dir).state_rounds():
                try:
                    copy_base(first, cfg)
                except RejectedFile as refused:
                    print(f"rl-swarm: sapo-table: {refused}: not copied; {arm.label} (seed {seed}) warms up its own")


def copy_base(source_cfg: SwarmConfig, target_cfg: SwarmConfig) -> None:
    """The base of one experiment into another, signed again by the other's coordinator key (this machine's,
    which its `up` publishes): its workers take a base only when their coordinator signed it. Only a base the
    source's coordinator (this machine) signed is copied, never one a peer planted there. Copied, then renamed
    into place: `up` sees a whole base or none."""
    source, target = ExperimentFolder(source_cfg.experiment_dir), ExperimentFolder(target_cfg.experiment_dir)
    meta = signed_base_meta(source, coordinator_key(source_cfg, source)[1])
    if meta is None:
        raise RejectedFile(f"{source.base_dir}: no base to copy")
    key = coordinator_key(target_cfg, target)[0]
    target.root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.base_dir)
    try:
        copy_regular_files(source.base_dir, tmp)
        if file_sha256(tmp / BASE_WEIGHTS) != meta["files"][BASE_WEIGHTS]:
            raise RejectedFile(f"{source.base_dir}: its weights are not the ones its meta.json signed for")
        write_atomic(tmp / "meta.json", json.dumps(key.sign(meta), allow_nan=False).encode("utf-8"))
        sync_folder(tmp, files=True)        # the weights on disk before the rename that makes them the arm's base
        os.replace(tmp, target.base_dir)
    except (OSError, SwarmError):
        remove(tmp)
        raise
    sync_folder(target.root)


class ArmRunner:
    """Runs arms as `rl-swarm up` processes, at most `parallel` at a time, in order; Ctrl-C, SIGTERM and a
    terminal's hang-up stop them cleanly."""

    def __init__(self, arms: list[Arm], base_env: Mapping[str, str], log_dir: Path, parallel: int, stall_s: float):
        self.arms, self.base_env, self.log_dir = arms, dict(base_env), log_dir
        self.parallel, self.stall_s = max(1, parallel), stall_s
        self.folders = {arm.experiment: ExperimentFolder(arm.config(base_env).experiment_dir) for arm in arms}
        self.named = {arm.experiment: arm for arm in arms}
        self.running: dict[str, subprocess.Popen] = {}
        self.codes: dict[str, int] = {}
        self.stopping = False
        self.terminal: tuple[int, ...] = ()

    def run(self) -> dict[str, int]:
        """Exit code of each arm's `up` (0 finished, 130 stopped, 1 failed), by experiment."""
        previous = signal.signal(signal.SIGTERM, lambda *_: self.stop())
        # the swarms run in sessions of their own: a hang-up reaches this process alone, which stops them
        self.terminal = terminal_outputs()
        before_hangup = on_hangup(self.hang_up)
        waiting = list(self.arms)
        progress, progress_at = -1, time.monotonic()
        said_at = time.monotonic()
        try:
            while (waiting and not self.stopping) or self.running:
                while waiting and len(self.running) < self.parallel and not self.stopping:
                    arm = waiting.pop(0)
                    if self._finished(arm):     # its `up` would say so and stop: no process to start
                        self.codes[arm.experiment] = 0
                    else:
                        self._start(arm)
                self._reap()
                if self.running and time.monotonic() - said_at >= PROGRESS_S:
                    print(f"rl-swarm: sapo-table: {self._progress()}", flush=True)
                    said_at = time.monotonic()
                done = self._rounds_done()
                if done != progress:
                    progress, progress_at = done, time.monotonic()
                elif time.monotonic() - progress_at > self.stall_s:
                    self.stop()
                    raise SwarmError(f"no swarm of the table finished a round for {self.stall_s:.0f}s: stopped them "
                                     f"all; see the logs in {self.log_dir}")
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.stop()
            self._wait_all()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if before_hangup is not None:
                signal.signal(signal.SIGHUP, before_hangup)
        return self.codes

    def _finished(self, arm: Arm) -> bool:
        """Whether the arm's coordinator signed that it ran all of its MAX_ROUNDS (a raised one runs on)."""
        cfg = arm.config(self.base_env)
        folder = ExperimentFolder(cfg.experiment_dir)
        # the coordinator key this machine pinned for the experiment, as its `up` would check it
        finished = read_finished(folder, KeyRing(folder, pins_dir=local_key_dir(cfg.cache_dir, folder.root) / "pins"))
        return finished is not None and finished.covers(cfg.max_rounds)

    def _start(self, arm: Arm) -> None:
        log = self.log_dir / f"{arm.experiment}.log"
        out = open(log, "ab")
        try:
            self.running[arm.experiment] = subprocess.Popen(
                _command("up"), env=arm.environment(self.base_env), stdout=out, stderr=subprocess.STDOUT,
                **session_of_its_own())
        finally:
            out.close()         # the child holds its own copy of the descriptor
        print(f"rl-swarm: sapo-table: {arm.label} (seed {arm.seed}) started: {arm.experiment}, log {log}", flush=True)

    def _reap(self) -> None:
        for name, process in list(self.running.items()):
            if process.poll() is not None:
                self.codes[name] = process.returncode
                del self.running[name]
                arm = self.named[name]
                print(f"rl-swarm: sapo-table: {arm.label} (seed {arm.seed}) "
                      f"{'finished' if process.returncode == 0 else f'ended with exit {process.returncode}'} at "
                      f"round {self._round_of(name)}", flush=True)

    def _round_of(self, name: str) -> int:
        """The newest round the arm's coordinator started (0 before its first, or while its folder is unread)."""
        try:
            rounds = self.folders[name].state_rounds()
        except OSError:
            return 0
        return rounds[-1] if rounds else 0

    def _rounds_done(self) -> int:
        # the running swarms' only: an ended one's rounds no longer move, and on a bucket each look is a billed LIST
        return sum(self._round_of(name) for name in self.running)

    def _progress(self) -> str:
        return ", ".join(f"{self.named[name].label} (seed {self.named[name].seed}) round {self._round_of(name)}/"
                         f"{self.named[name].config(self.base_env).max_rounds}" for name in self.running)

    def hang_up(self, _signum: int, _frame: object) -> None:
        print_nowhere(self.terminal)
        self.stop()

    def stop(self) -> None:
        """SIGINT to every running swarm, once: each stops as on Ctrl-C (checkpoints saved, resumable); a second
        SIGINT would kill it (a hang-up comes twice: the shell's, then the kernel's)."""
        if self.stopping:
            return
        self.stopping = True
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)

    def _wait_all(self) -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        for name, process in list(self.running.items()):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            self.codes[name] = process.returncode
            del self.running[name]
