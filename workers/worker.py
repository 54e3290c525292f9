"""A worker process: load the model, resume, and play rounds as the coordinator starts them.

`worker_main` is the spawn target; it talks to the supervisor only through the shared folder,
a stop Event and its exit code (0: finished or stopped on request, non-zero: crashed).
"""

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from configs_env import SwarmConfig, SwarmError
from workers.checkpoint import (METRICS_TAIL, BestModel, CheckpointMeta, clear_leftovers, load_latest_checkpoint,
                                rewrite_lost_records, save_checkpoint)
from workers.shared_folder.drive_sim import simulate_drive
from workers.evaluation import eval_due, eval_file, evaluate_held_out, held_out_questions, read_held_out
from workers.shared_folder.exchange import TERMINAL, Exchange, Outbox, read_heartbeats
from workers.shared_folder.folder import (ExperimentFolder, RejectedFile, append_jsonl, is_visible, open_append,
                                          with_retries, write_json_atomic)
from workers.learning.model import Policy, enable_activation_checkpointing, load_policy, use_activation_checkpointing
from workers.learning.optim import make_optimizer
from workers.shared_folder.protocol import Heartbeat, RoundMetrics, RoundState
from workers.round_loop import play_round, rehearse_largest_round
from workers.learning.tasks import TaskMix
from workers.warmup import load_base

log = logging.getLogger("workers.worker")

HEARTBEAT_S = 2.0
OUTBOX_RETRY_S = 2.0      # while waiting for a round, how often writes the folder refused are tried again
# how long a leaving worker keeps trying them: shorter when asked to stop, inside the supervisor's 30 s grace
OUTBOX_EXIT_S, OUTBOX_EXIT_STOPPING_S = 60.0, 20.0
EXIT_CRASH, EXIT_CONFIG, EXIT_ORPHANED, EXIT_OUT_OF_MEMORY = 1, 2, 3, 4
TINY_LEARNING_RATE, GPT2_LEARNING_RATE = 3e-5, 3e-6


@dataclass(frozen=True)
class WorkerSpec:
    cfg: SwarmConfig
    node: str
    index: int
    model_name: str
    device: str
    parent_pid: int
    generation_splits: int = 1    # doubled by the supervisor after each CUDA out-of-memory exit


def default_learning_rate(model_name: str) -> float:
    # A round gives each worker only I+J groups (16 completions by default), so most of a step is noise, and
    # Adam moves every weight by ~lr whatever the noise: the tiny model's held-out accuracy fell at 1e-4 and
    # collapsed at 3e-4 in 200 rounds, and rose at 2e-5..5e-5 (3e-5 best over seeds 1-3, README "Learning").
    # GPT-2 124M (H200, bench/LEARNING.md): held-out accuracy fell from the warm-up's at 1e-5 and rose at 3e-6.
    return TINY_LEARNING_RATE if "tiny" in model_name else GPT2_LEARNING_RATE


def _log_to_folder(log_dir: Path) -> None:
    """Everything the process prints, Python or C level, goes to logs/<node>/worker.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fd = open_append(log_dir / "worker.log")      # never through a link a peer planted at the log's name
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class Worker:
    def __init__(self, spec: WorkerSpec, stop: threading.Event):
        self.spec, self.cfg, self.stop = spec, spec.cfg, stop
        self.folder = ExperimentFolder(spec.cfg.experiment_dir)
        self.exchange = Exchange(self.folder, spec.node)
        self.beat = Heartbeat(node=spec.node, role="worker", pid=os.getpid(), host=socket.gethostname(),
                              instance=uuid.uuid4().hex[:12], status="starting", round=0, stage=0,
                              started_at=time.time(), updated_at=time.time(), progress_at=time.time())
        self._beat_lock = threading.Lock()
        self.outbox = Outbox()

    # -- heartbeat -----------------------------------------------------------------------------------
    def update(self, **changes: object) -> None:
        with self._beat_lock:
            now = time.time()
            if changes.get("status", self.beat.status) != self.beat.status or "round" in changes:
                changes["progress_at"] = now
            troubles = [*self.exchange.trouble.values()] + ([self.outbox.trouble] if self.outbox.trouble else [])
            self.beat = replace(self.beat, updated_at=now, rejected=len(self.exchange.rejected),
                                note="; ".join(troubles) or None, **changes)
            try:
                self.exchange.write_heartbeat(self.beat)
            except OSError as exc:  # a Drive hiccup must not kill the worker; the next beat, 2 s on, retries
                log.warning("heartbeat not written: %s", exc)

    def _heartbeat_loop(self, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_S):
            self.update()

    # -- rounds --------------------------------------------------------------------------------------
    def _coordinator_alive(self) -> bool:
        try:
            beat = read_heartbeats(self.folder).get("coordinator")
        except OSError as exc:     # cannot tell now; the next check, PEER_TIMEOUT later, decides
            log.warning("could not read the coordinator's heartbeat: %s", exc)
            return True
        return beat is not None and beat.age() < self.cfg.peer_timeout

    def wait_for_round(self, at_least: int) -> RoundState | None:
        """The newest round once it is >= at_least; None when the swarm finished or we must stop."""
        quiet_since = last_flush = time.monotonic()
        while not self.stop.is_set():
            if os.getppid() != self.spec.parent_pid:
                log.error("the supervisor (pid %d) is gone; exiting", self.spec.parent_pid)
                sys.exit(EXIT_ORPHANED)
            try:
                rounds = self.folder.state_rounds()
            except OSError as exc:     # a Drive hiccup: as if no new round yet
                log.warning("could not list the round states: %s", exc)
                rounds = []
            state = self._newest_round(rounds, at_least)
            if state is not None:
                return state
            # the last round's rewards file may be waiting in the outbox: without it no round ends
            if self.outbox and time.monotonic() - last_flush >= OUTBOX_RETRY_S:
                self.outbox.flush(attempts=1)
                self.update()
                last_flush = time.monotonic()
            if is_visible(self.folder.finished_file) or at_least > self.cfg.max_rounds:
                return None
            if time.monotonic() - quiet_since > self.cfg.peer_timeout:
                if not self._coordinator_alive():
                    raise SwarmError(f"no coordinator heartbeat for {self.cfg.peer_timeout:.0f}s and no round "
                                     f"{at_least} in {self.folder.root}/state: start the swarm with `rl-swarm up`")
                quiet_since = time.monotonic()
            self.stop.wait(0.2)
        return None

    def _newest_round(self, rounds: list[int], at_least: int) -> RoundState | None:
        """The newest intact round state >= at_least; a half-synced or bad one is skipped (warned about once)."""
        for round_ in reversed(rounds):
            if round_ < at_least:
                break

            def parse(record: dict, where: str, expected: int = round_) -> RoundState:
                state = RoundState.from_json(record, where)
                if state.round != expected:
                    raise RejectedFile(f"{where}: says round {state.round}, which its name contradicts; skipped")
                return state

            state = self.exchange.read_record(self.folder.round_state_file(round_), parse)
            if state is not None:
                return state
        return None

    def expected_peers(self, state: RoundState) -> set[str]:
        """The workers the coordinator listed for this round, less those whose heartbeat says they stopped."""
        try:
            beats = self.exchange.read_heartbeats()
        except OSError as exc:     # a Drive hiccup: wait for every listed worker (the wait is bounded anyway)
            log.warning("could not read heartbeats: %s", exc)
            beats = {}
        gone = {n for n, b in beats.items() if b.status in TERMINAL or b.age() > self.cfg.peer_timeout}
        return set(state.nodes) - gone - {self.spec.node}

    def run(self) -> None:
        self.update()
        done = threading.Event()
        threading.Thread(target=self._heartbeat_loop, args=(done,), daemon=True, name="heartbeat").start()
        try:
            self._play()
        finally:
            done.set()

    def _play(self) -> None:
        cfg, spec = self.cfg, self.spec
        policy = load_policy(spec.model_name, spec.device, cfg.cache_dir)
        lr = cfg.learning_rate or default_learning_rate(spec.model_name)
        optimizer = make_optimizer(policy.model, lr)
        if use_activation_checkpointing(cfg.gradient_checkpointing, policy.device):
            enable_activation_checkpointing(policy.model)
        checkpoints = self.folder.checkpoint_dir(spec.node)
        clear_leftovers(checkpoints)
        meta = load_latest_checkpoint(checkpoints, policy.model, optimizer, spec.model_name)
        last_done = last_saved = meta.round if meta else 0
        history: deque[RoundMetrics] = deque(meta.metrics_tail if meta else (), maxlen=METRICS_TAIL)
        if meta:
            log.info("resumed from checkpoint of round %d", meta.round)
            for round_ in rewrite_lost_records(self.folder, spec.node, meta):
                log.info("round %d: metrics or rewards file rewritten from the checkpoint", round_)
            if history:
                self.update(last_reward=history[-1].reward_mean, last_accuracy=history[-1].accuracy)
        elif load_base(self.folder.root, policy):
            log.info("starting from the experiment's warmed-up base model")
        tasks = TaskMix(cfg.tasks, seed=cfg.seed + spec.index)
        # the KL anchor is the policy every worker started from (the base), frozen; kept only when beta > 0
        reference = None
        if cfg.kl_beta > 0:
            reference = load_policy(spec.model_name, spec.device, cfg.cache_dir).model.eval().requires_grad_(False)
            load_base(self.folder.root, Policy(reference, policy.tokenizer, spec.model_name, policy.device))

        width = rehearse_largest_round(policy, optimizer, cfg, tasks, spec.generation_splits)
        if width:
            log.info("rehearsed the largest round (%d-token prompts, %d new tokens): %.2f GiB reserved at most",
                     width, cfg.max_new_tokens, torch.cuda.max_memory_reserved(policy.device) / 2**30)
        held_out = held_out_questions(cfg.tasks, cfg.eval_size)
        best = BestModel(checkpoints, spec.node, spec.model_name)

        def evaluate(round_: int) -> None:
            self.update(status="evaluating")
            result = evaluate_held_out(policy, cfg, held_out, spec.node, round_, spec.generation_splits)
            path = eval_file(self.folder, spec.node)
            self.outbox.send(f"appending to {path}", partial(append_jsonl, path, result.to_json()))
            log.info("%s: held-out greedy exact-match %.1f%% of %d questions (%.1fs)",
                     f"after round {round_}" if round_ else "before round 1", 100 * result.accuracy,
                     result.questions, result.seconds)
            try:
                if best.offer(round_, result.accuracy, policy.model):
                    log.info("round %d: the best held-out accuracy so far; model saved to %s/best", round_,
                             checkpoints)
            except OSError as exc:      # training goes on; the next better evaluation tries again
                log.warning("round %d: best model not saved (%s)", round_, exc)

        # round 0 is the start, evaluated only when not resuming; a resumed worker makes up an evaluation
        # that a crash cut off at its checkpoint's round; the file is the record, so none runs twice
        evaluated = {row.round for row in read_held_out(eval_file(self.folder, spec.node))[0]}
        if held_out and eval_due(last_done, cfg.max_rounds, cfg.eval_every) and last_done not in evaluated:
            evaluate(last_done)

        def save(round_: int) -> bool:
            """False when the folder refused it: training goes on and the next round tries again."""
            try:
                with_retries(lambda: save_checkpoint(checkpoints, CheckpointMeta(round_, spec.node, spec.model_name,
                                                                                 tuple(history)),
                                                     policy.model, optimizer), f"checkpoint of round {round_}")
            except OSError as exc:
                log.warning("round %d: checkpoint not saved (%s); the next round tries again", round_, exc)
                return False
            return True

        checkpoint_owed = False
        while not self.stop.is_set():
            self.update(status="waiting", round=last_done)
            state = self.wait_for_round(last_done + 1)
            if state is None:
                break
            round_ = state.round
            self.update(status="generating", round=round_)
            metrics = play_round(policy, optimizer, cfg, tasks, self.exchange, spec.index, round_, self.stop,
                                 lambda state=state: self.expected_peers(state),
                                 lambda stage: self.update(status=stage),
                                 reference, spec.generation_splits)
            if metrics is None:
                break
            record = metrics.to_json()
            history.append(metrics)
            last_done = round_
            # the checkpoint before the metrics line: a kill between them leaves the line to the restart
            # (rewrite_lost_records), where the other order would replay the round and write it twice
            due = round_ % cfg.checkpoint_interval == 0 or round_ >= cfg.max_rounds
            if (due or checkpoint_owed) and save(round_):
                last_saved = round_
                checkpoint_owed = False
            elif due:
                checkpoint_owed = True
            metrics_file = self.folder.metrics_file(spec.node)
            # a line doubled by a retry after a write that did land is harmless: readers keep a round's last row
            self.outbox.send(f"appending to {metrics_file}", partial(append_jsonl, metrics_file, record))
            # before the "done" mark, so the coordinator's last round waits for the final evaluation
            if held_out and eval_due(round_, state.max_rounds, cfg.eval_every) and not self.stop.is_set():
                evaluate(round_)
            # the rewards file is the round's "done" mark for the coordinator, so it is written last
            reward_file = self.folder.reward_file(round_, spec.node)
            self.outbox.send(f"writing {reward_file}", partial(write_json_atomic, reward_file, record))
            self.update(status="waiting", last_reward=metrics.reward_mean, last_accuracy=metrics.accuracy)
            log.info("round %d: reward %.3f exact %.2f loss %.4f local %d external %d/%d (%.1fs)", round_,
                     metrics.reward_mean, metrics.accuracy, metrics.loss, metrics.local_groups,
                     metrics.external_groups, metrics.external_available, metrics.round_s)
        if last_done > last_saved and save(last_done):
            last_saved = last_done
        self.exchange.trouble.clear()            # a round's publishing trouble is history once it is over
        if not self._drain_outbox():
            # exit non-zero, so the supervisor restarts this worker: the restart rewrites the metrics lines
            # and the rewards file its checkpoint holds (rewrite_lost_records)
            raise OSError(f"{len(self.outbox)} record(s) not written: the shared folder kept refusing them "
                          f"(checkpoint of round {last_saved} saved)")
        self.update(status="stopped" if self.stop.is_set() else "done", round=last_done)

    def _drain_outbox(self) -> bool:
        """Keep trying what waits for a bounded time, as a worker leaves; True when it all landed."""
        deadline = time.monotonic() + (OUTBOX_EXIT_STOPPING_S if self.stop.is_set() else OUTBOX_EXIT_S)
        while not self.outbox.flush(attempts=1):
            if time.monotonic() >= deadline:
                return False
            time.sleep(OUTBOX_RETRY_S)
        return True


def worker_main(spec: WorkerSpec) -> None:
    """Process target (spawn): Ctrl-C reaches the supervisor, which asks us to stop with SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    folder = ExperimentFolder(spec.cfg.experiment_dir)
    _log_to_folder(folder.log_dir(spec.node))
    simulate_drive(folder.root, spec.cfg.drive_sim_lag, spec.cfg.drive_sim_fail_rate,
                   seed=spec.cfg.seed * 1000 + spec.index + 1)
    if spec.device == "cpu":
        torch.set_num_threads(1)
    else:
        # several processes share the GPU: expandable segments keep each one's cache from fragmenting
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    worker = Worker(spec, stop)
    try:
        worker.run()
    except SwarmError as error:
        log.error("%s", error)
        _last_words(worker, str(error))
        sys.exit(EXIT_CONFIG)
    except torch.cuda.OutOfMemoryError as error:
        log.error("CUDA out of memory with generation in %d batch(es): %s", spec.generation_splits,
                  str(error).splitlines()[0])
        _last_words(worker, f"CUDA out of memory (generation in {spec.generation_splits} batches)")
        sys.exit(EXIT_OUT_OF_MEMORY)
    except Exception as error:
        log.exception("worker crashed")
        _last_words(worker, f"{type(error).__name__}: {error}".splitlines()[0][:300])
        raise


def _last_words(worker: Worker, message: str) -> None:
    try:
        worker.update(status="crashed", last_error=message)
    except OSError as exc:
        log.warning("could not record the error in the heartbeat: %s", exc)
