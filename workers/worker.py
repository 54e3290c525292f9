"""A worker: load the model, resume, and play rounds as the coordinator starts them, recording each.

The process around it (log file, signals, device, exit codes) is workers.worker_process.
"""

import logging
import os
import sys
import threading
import time
from dataclasses import replace
from functools import partial

import torch

from configs_env import SwarmConfig, SwarmError
from workers.best_model import BestModel
from workers.checkpoint import (CheckpointMeta, Progress, clear_leftovers, load_latest_checkpoint,
                                rewrite_lost_records, snapshot_checkpoint, write_checkpoint)
from workers.checkpoint_writer import BackgroundWriter
from workers.evaluation import eval_due, evaluate_held_out, held_out_questions
from workers.heartbeat import Heartbeats
from workers.host_copies import HostCopies
from workers.learning.model import (Policy, default_learning_rate, enable_activation_checkpointing, load_policy,
                                   use_activation_checkpointing)
from workers.learning.optim import make_optimizer
from workers.learning.tasks import TaskMix
from workers.processes import COORDINATOR_PATIENCE, EXIT_ORPHANED, WorkerSpec
from workers.profiling import profiled
from workers.round_loop import Node, play_round, rehearse_largest_round
from workers.shared_folder import mount
from workers.shared_folder.exchange import NEWEST_LOOKED, Exchange, Outbox, newest_round_state, newest_signed_round
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.held_out import eval_file, read_held_out
from workers.shared_folder.json_records import write_json_atomic
from workers.shared_folder.jsonl import append_jsonl
from workers.shared_folder.protocol import Heartbeat, RoundMetrics, RoundState, Status
from workers.shared_folder.rejections import FolderError
from workers.shared_folder.retries import with_retries
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey, local_key_dir
from workers.warmup import load_base

log = logging.getLogger("workers.worker")

ROUND_POLL_S = 0.2        # between looks for a new round; on this host the coordinator's doorbell cuts it short
# while waiting for round r, a worker looks for round r's file and those after it; it lists state/ this often too,
# so a round file a peer deleted does not hide the later ones for ever
LIST_ROUNDS_S = 2.0
OUTBOX_RETRY_S = 2.0      # while waiting for a round, how often writes the folder refused are tried again
# how long a leaving worker keeps trying them: shorter when asked to stop, inside the supervisor's 30 s grace
OUTBOX_EXIT_S, OUTBOX_EXIT_STOPPING_S = 60.0, 20.0
WRITES_EXIT_S = 300.0     # how long a worker that finished waits for its checkpoints' writes (a stop: the above)


class NoCoordinator(SwarmError):
    """No coordinator heartbeat for COORDINATOR_PATIENCE x PEER_TIMEOUT: restartable, unlike a bad setting."""


class Worker:
    def __init__(self, spec: WorkerSpec, stop: threading.Event):
        self.spec, self.cfg, self.stop = spec, spec.cfg, stop
        self.folder = ExperimentFolder(spec.cfg.experiment_dir)
        mount.claim(self.folder.root)      # made by the supervisor; a dropped mount must not make it again
        self.exchange = node_exchange(self.folder, spec.cfg, spec.node)
        self.outbox = Outbox()
        self.heartbeats = Heartbeats(self.exchange, replace(Heartbeat.first(spec.node, "worker", Status.STARTING),
                                                            device=spec.device), self._troubles)
        self.checkpoints = self.folder.checkpoint_dir(spec.node)
        self.writer = BackgroundWriter(f"checkpoints of {spec.node}")
        self.copies = HostCopies()          # checkpoints copied into the memory the previous one's write used
        self.progress = Progress()
        self.held_out: list = []
        self.best: BestModel | None = None
        # the experiment's MAX_ROUNDS as its coordinator's newest round state says: a machine that joined may have
        # another of its own, and a coordinator resumed with a raised one carries its workers on
        self.max_rounds: int | None = None

    # -- heartbeat -----------------------------------------------------------------------------------
    @property
    def beat(self) -> Heartbeat:
        return self.heartbeats.beat

    def update(self, **changes: object) -> None:
        self.heartbeats.update(**changes)

    def _troubles(self) -> list[str]:
        """What the heartbeat's note says: the folder's refusals of this round, the writes still waiting."""
        return [*self.exchange.trouble.values()] + ([self.outbox.trouble] if self.outbox.trouble else [])

    # -- rounds --------------------------------------------------------------------------------------
    def _coordinator_alive(self) -> bool:
        try:
            beat = self.exchange.read_heartbeats().get(COORDINATOR)
        except OSError as exc:     # cannot tell now; the next check, PEER_TIMEOUT later, decides
            log.warning("could not read the coordinator's heartbeat: %s", exc)
            return True
        return beat is not None and beat.age() < self.cfg.peer_timeout

    def wait_for_round(self, at_least: int) -> RoundState | None:
        """The newest round once it is >= at_least; None when the swarm finished or we must stop.

        Without a coordinator the worker keeps waiting (it may start later, or restart), saying so once per
        PEER_TIMEOUT, and raises NoCoordinator after COORDINATOR_PATIENCE of them.
        """
        quiet_since = last_flush = time.monotonic()
        listed_at = time.monotonic()
        unheard_since: float | None = None      # when the coordinator was first found silent
        while not self.stop.is_set():
            if os.getppid() != self.spec.parent_pid:
                log.error("the supervisor (pid %d) is gone; exiting", self.spec.parent_pid)
                sys.exit(EXIT_ORPHANED)
            if time.monotonic() - listed_at >= LIST_ROUNDS_S:
                listed_at, rounds = time.monotonic(), self._state_rounds()
            else:       # one look at one file a poll; a worker far behind (or forged files) gets the listing
                rounds = self.folder.state_rounds_from(at_least, NEWEST_LOOKED)
                rounds = self._state_rounds() if rounds is None else rounds
            state = self._newest_round(rounds, at_least) if rounds else None
            if state is not None:
                return state
            # the last round's rewards file may be waiting in the outbox: without it no round ends
            if self.outbox and time.monotonic() - last_flush >= OUTBOX_RETRY_S:
                self.outbox.flush(attempts=1)
                self.update()
                last_flush = time.monotonic()
            if self.exchange.finished() is not None or (self.max_rounds is not None and at_least > self.max_rounds):
                return None
            if time.monotonic() - quiet_since > self.cfg.peer_timeout:
                unheard_since = self._check_coordinator(at_least, unheard_since)
                quiet_since = time.monotonic()
            self.exchange.doorbell.wait(ROUND_POLL_S)      # the coordinator's new round rings it
        return None

    def _state_rounds(self) -> list[int]:
        try:
            return self.folder.state_rounds()
        except OSError as exc:     # a Drive hiccup: as if no new round yet
            log.warning("could not list the round states: %s", exc)
            return []

    def _check_coordinator(self, at_least: int, unheard_since: float | None) -> float | None:
        """Called once per PEER_TIMEOUT of a quiet wait: when the coordinator was first found silent, or None."""
        if self._coordinator_alive():
            if unheard_since is not None:
                log.info("the coordinator is back; waiting for round %d", at_least)
                self.update(status=Status.WAITING)
            return None
        now = time.monotonic()
        unheard_since = now - self.cfg.peer_timeout if unheard_since is None else unheard_since
        silent, patience = now - unheard_since, COORDINATOR_PATIENCE * self.cfg.peer_timeout
        if silent >= patience:
            raise NoCoordinator(f"no coordinator heartbeat for {silent:.0f}s and no round {at_least} in "
                                f"{self.folder.root}/state: is `rl-swarm up` running on this GDRIVE_PATH and "
                                f"EXPERIMENT_NAME? (the worker is restarted to wait again)")
        log.warning("no coordinator heartbeat for %.0fs and no round %d in %s: waiting for it (up to %.0fs)",
                    silent, at_least, self.folder.state_dir, patience)
        self.update(status=Status.WAITING_FOR_COORDINATOR)
        return unheard_since

    def _newest_round(self, rounds: list[int], at_least: int) -> RoundState | None:
        """The newest round state >= at_least signed by the coordinator; a half-synced, bad or forged one is
        skipped (warned about once)."""
        return newest_round_state(self.exchange.round_state, rounds, at_least)

    def expected_peers(self, state: RoundState) -> set[str]:
        """The workers the coordinator listed for this round, less those whose heartbeat says they stopped."""
        try:
            beats = self.exchange.read_heartbeats()
        except OSError as exc:     # a Drive hiccup: wait for every listed worker (the wait is bounded anyway)
            log.warning("could not read heartbeats: %s", exc)
            beats = {}
        gone = {n for n, b in beats.items() if b.status in Status.TERMINAL or b.age() > self.cfg.peer_timeout}
        return set(state.nodes) - gone - {self.spec.node}

    def run(self) -> None:
        self.update()
        self.heartbeats.start()
        try:
            self._play()
        finally:
            self.heartbeats.stop()

    def _play(self) -> None:
        node = self._start()
        while not self.stop.is_set():
            self.update(status=Status.WAITING, round=self.progress.last_done)
            state = self.wait_for_round(self.progress.last_done + 1)
            if state is None:
                break
            self.max_rounds = state.max_rounds
            self.update(status=Status.GENERATING, round=state.round)
            with profiled(state.round == self.cfg.profile_round, self.folder.log_dir(self.spec.node) /
                          f"profile-round-{state.round}.txt", node.policy.device, f"round {state.round}"):
                metrics = play_round(node, state.round, self.stop, lambda state=state: self.expected_peers(state),
                                     lambda stage: self.update(status=stage))
            if metrics is None:
                break
            self._record(node, state, metrics)
        self._leave(node)

    # -- start, record, leave ------------------------------------------------------------------------
    def _start(self) -> Node:
        """Load the model, resume from the newest checkpoint (or start from the base), rehearse, evaluate."""
        cfg, spec = self.cfg, self.spec
        policy = load_policy(spec.model_name, spec.device, cfg.cache_dir)
        optimizer = make_optimizer(policy.model, cfg.learning_rate or default_learning_rate(spec.model_name))
        if use_activation_checkpointing(cfg.gradient_checkpointing, policy.device):
            enable_activation_checkpointing(policy.model)
        clear_leftovers(self.checkpoints)
        meta = load_latest_checkpoint(self.checkpoints, policy.model, optimizer, spec.model_name,
                                      self.exchange.key)
        self.progress = Progress.resumed(meta)
        if meta:
            log.info("resumed from checkpoint of round %d", meta.round)
            rewritten, self.progress.lined = rewrite_lost_records(self.folder, spec.node, meta, self.exchange.key)
            for round_ in rewritten:
                log.info("round %d: metrics or rewards file rewritten from the checkpoint", round_)
            if self.progress.history:
                last = self.progress.history[-1]
                self.update(last_reward=last.reward_mean, last_accuracy=last.accuracy)
        elif load_base(self.folder.root, policy, self.exchange.keyring, self.exchange.key.predates_signed_files):
            log.info("starting from the experiment's warmed-up base model")
        node = Node(policy, optimizer, cfg, TaskMix(cfg.tasks, seed=cfg.seed + spec.index), self.exchange,
                    spec.index, self._reference(policy), spec.generation_splits, self.outbox)
        width = rehearse_largest_round(node)
        if width:
            log.info("rehearsed the largest round (%d-token prompts, %d new tokens): %.2f GiB reserved at most",
                     width, cfg.max_new_tokens, torch.cuda.max_memory_reserved(policy.device) / 2**30)
        self.held_out = held_out_questions(cfg.tasks, cfg.eval_size)
        self.best = BestModel(self.checkpoints, self.exchange.key, spec.model_name)
        # round 0 is the start, evaluated only when not resuming; a resumed worker makes up an evaluation
        # that a crash cut off at its checkpoint's round; the file is the record, so none runs twice
        done = self.progress.last_done
        evaluated = {row.round for row in read_held_out(eval_file(self.folder, spec.node), self.exchange.keyring)[0]}
        if self.held_out and eval_due(done, self._round_limit(done), cfg.eval_every) and done not in evaluated:
            self._evaluate(node, done)
        return node

    def _round_limit(self, done: int) -> int:
        """MAX_ROUNDS as the coordinator's newest round state gives it (as _record reads it: a resumed coordinator
        may raise it, and a machine that joined may hold an older config.json's)."""
        try:
            newest = newest_signed_round(self.folder, self.exchange.keyring) if done else None
        except OSError:         # a Drive hiccup: this machine's own value decides one evaluation at most
            newest = None
        return newest.max_rounds if newest else self.cfg.max_rounds

    def _reference(self, policy: Policy) -> torch.nn.Module | None:
        """The KL anchor: the policy every worker started from (the base), frozen; kept only when beta > 0."""
        if self.cfg.kl_beta <= 0:
            return None
        spec = self.spec
        reference = load_policy(spec.model_name, spec.device, self.cfg.cache_dir).model.eval().requires_grad_(False)
        load_base(self.folder.root, Policy(reference, policy.tokenizer, spec.model_name, policy.device),
                  self.exchange.keyring, self.exchange.key.predates_signed_files)
        return reference

    def _record(self, node: Node, state: RoundState, metrics: RoundMetrics) -> None:
        """Checkpoint, metrics line, evaluation, then the rewards file that tells the coordinator we are done."""
        # signed: the rewards file speaks for this node (the coordinator counts it), the metrics line is the same
        cfg, round_, record = self.cfg, state.round, self.exchange.key.sign(metrics.to_json())
        progress = self.progress
        progress.history.append(metrics)
        progress.last_done = round_
        # the checkpoint is taken before the metrics line, and lands behind the round: a kill after it landed leaves
        # the line to the restart (rewrite_lost_records); one before replays the round from the checkpoint before
        # (the same update: its seed and the peers' rollouts are in the folder), whose line is there (lined)
        self._writes_ended()
        if round_ % cfg.checkpoint_interval == 0 or round_ >= state.max_rounds or progress.checkpoint_owed:
            progress.checkpoint_owed = not self._save(node, round_)
        metrics_file = self.folder.metrics_file(self.spec.node)
        # a line doubled by a retry after a write that did land is harmless: readers keep a round's last row
        if round_ not in progress.lined:
            self.outbox.send(f"appending to {metrics_file}", partial(append_jsonl, metrics_file, record))
        # before the "done" mark, so the coordinator's last round waits for the final evaluation
        if self.held_out and eval_due(round_, state.max_rounds, cfg.eval_every) and not self.stop.is_set():
            self._evaluate(node, round_)
            if round_ >= state.max_rounds:      # its line may wait behind the best model's write
                self._finish_writes(WRITES_EXIT_S)
        # the rewards file is the round's "done" mark for the coordinator, so it is written last
        reward_file = self.folder.reward_file(round_, self.spec.node)
        if self.outbox.send(f"writing {reward_file}", partial(write_json_atomic, reward_file, record)):
            self.exchange.doorbell.ring()      # the coordinator of this host sees the round done now
        self.update(status=Status.WAITING, last_reward=metrics.reward_mean, last_accuracy=metrics.accuracy)
        log.info("round %d: reward %.3f exact %.2f loss %s local %d external %d/%d (%.1fs)", round_,
                 metrics.reward_mean, metrics.accuracy,
                 "-" if metrics.loss is None else f"{metrics.loss:.4f}", metrics.local_groups,
                 metrics.external_groups, metrics.external_available, metrics.round_s)

    def _evaluate(self, node: Node, round_: int) -> None:
        """Held-out greedy accuracy to eval.jsonl; the model kept as best/ when it beats every earlier one."""
        self.update(status=Status.EVALUATING)
        result = evaluate_held_out(node.policy, self.cfg, self.held_out, self.spec.node, round_, node.splits)
        log.info("%s: held-out greedy exact-match %.1f%% of %d questions (%.1fs; answers of %.1f tokens on average, "
                 "%d cut off at MAX_NEW_TOKENS=%d)", f"after round {round_}" if round_ else "before round 1",
                 100 * result.accuracy, result.questions, result.seconds, result.mean_tokens or 0.0,
                 result.cut_off or 0, self.cfg.max_new_tokens)
        path = eval_file(self.folder, self.spec.node)
        line = (f"appending to {path}", partial(append_jsonl, path, self.exchange.key.sign(result.to_json())))
        write = self.best.offer(round_, result.accuracy, node.policy.model)
        if write is not None:
            try:
                self.writer.submit("best", round_, f"best model of round {round_}", write)
                # the line after the model: a kill between them leaves no line, so the resumed worker evaluates
                # its checkpoint's round again and offers that model; never a best accuracy whose model is lost
                self.writer.submit("record", round_, *line)
                return
            except OSError as exc:      # training goes on; the next better evaluation tries again
                self.best.landed(round_, ok=False)
                log.warning("round %d: best model not saved (%s)", round_, exc)
        self.outbox.send(*line)

    def _save(self, node: Node, round_: int) -> bool:
        """A checkpoint, copied now and written behind the rounds; False when it could not be queued."""
        meta = CheckpointMeta(round_, self.spec.node, self.spec.model_name, tuple(self.progress.history))
        snapshot = snapshot_checkpoint(meta, node.policy.model, node.optimizer, self.copies)
        try:
            self.writer.submit("checkpoint", round_, f"checkpoint of round {round_}",
                               lambda: write_checkpoint(self.checkpoints, snapshot, self.exchange.key),
                               snapshot.release)
        except OSError as exc:
            log.warning("round %d: checkpoint not saved (%s); the next round tries again", round_, exc)
            return False
        self.progress.last_saved = round_
        return True

    def _writes_ended(self) -> None:
        """Take note of the checkpoints and best models whose writes ended; a failed checkpoint is owed again."""
        progress = self.progress
        for written in self.writer.finished():
            if written.kind == "best":
                self.best.landed(written.round, ok=written.error is None)
            if written.error is not None and written.kind == "record":       # waits in the outbox like any line
                self.outbox.send(written.what, written.write)
            elif written.error is not None:
                log.warning("round %d: %s not written (%s)%s", written.round, written.what, written.error,
                            "; the next round tries again" if written.kind == "checkpoint" else "")
                if written.kind == "checkpoint" and written.round == progress.last_saved:
                    progress.last_saved, progress.checkpoint_owed = progress.last_written, True
            elif written.kind == "checkpoint":
                progress.last_written = max(progress.last_written, written.round)
            elif written.kind == "best":
                log.info("round %d: the best held-out accuracy so far; model saved to %s/best", written.round,
                         self.checkpoints)

    def _leave(self, node: Node) -> None:
        """A last checkpoint, every record written (or a non-zero exit that the restart completes), a last beat."""
        progress = self.progress
        if progress.last_done > progress.last_saved:
            self._save(node, progress.last_done)
        # asked to stop, the writes and the records share the supervisor's grace
        stopping = self.stop.is_set()
        writes_by = time.monotonic() + (OUTBOX_EXIT_STOPPING_S if stopping else WRITES_EXIT_S)
        self._finish_writes(writes_by - time.monotonic())
        self.exchange.trouble.clear()            # a round's publishing trouble is history once it is over
        if not self._drain_outbox(writes_by if stopping else time.monotonic() + OUTBOX_EXIT_S):
            # exit non-zero, so the supervisor restarts this worker: the restart rewrites the metrics lines
            # and the rewards file its checkpoint holds (rewrite_lost_records)
            raise OSError(f"{len(self.outbox)} record(s) not written: the shared folder kept refusing them "
                          f"(checkpoint of round {progress.last_written} saved)")
        self.update(status=Status.STOPPED if self.stop.is_set() else Status.DONE, round=progress.last_done)

    def _finish_writes(self, timeout: float) -> None:
        """Wait for the writes behind the rounds, for up to `timeout` seconds, and take note of them."""
        if not self.writer.wait(timeout):
            log.warning("checkpoint writes still running after %.0fs; the checkpoint of round %d stands", timeout,
                        self.progress.last_written)
        self._writes_ended()

    def _drain_outbox(self, deadline: float) -> bool:
        """Keep trying what waits until `deadline` (monotonic), as a worker leaves; True when it all landed."""
        while not self.outbox.flush(attempts=1):
            if time.monotonic() >= deadline:
                return False
            time.sleep(OUTBOX_RETRY_S)
        return True


def node_exchange(folder: ExperimentFolder, cfg: SwarmConfig, node: str) -> Exchange:
    """The exchange of a node of this machine: its key (made on first use) published in the folder, and the
    coordinator's key pinned in this machine's key folder the first time it is met. FolderError when the folder
    holds another key for this node (another machine runs it) or another coordinator than the one pinned."""
    key_dir = local_key_dir(cfg.cache_dir, folder.root)
    key = NodeKey.load_or_create(key_dir, node)
    keyring = KeyRing(folder, pins_dir=key_dir / "pins")
    conflict = keyring.coordinator_conflict()
    if conflict:
        raise FolderError(conflict)
    with_retries(lambda: keyring.publish(key), f"publishing the public key of {node}")
    return Exchange(folder, node, key, keyring)
