"""The experiment's base: the supervised warm-up, run once per experiment in a process of its own (so the
supervisor never holds a CUDA context or the model's memory), with a progress bar and its result in a few lines."""

import multiprocessing as mp
import queue as queues

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from configs_env import SwarmConfig, SwarmError
from workers.processes import start_warmup
from workers.shared_folder.base_meta import signed_base_meta
from workers.shared_folder.exchange import newest_signed_round
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.signing import KeyRing, NodeKey

WARMUP_SILENCE_S = 600    # the warm-up reports every step; this long without a word means it is stuck


def coordinators_base(folder: ExperimentFolder, keyring: KeyRing, key: NodeKey) -> tuple[dict | None, str | None]:
    """The base's meta.json when this coordinator (`key`) signed it, or, for a key from before signed bases, an
    unsigned one it may have made; else None, and why it was refused (None too when there is no base)."""
    try:
        return signed_base_meta(folder, keyring, unsigned_ok=key.predates_signed_files), None
    except RejectedFile as refused:
        return None, str(refused)


def ensure_base(cfg: SwarmConfig, folder: ExperimentFolder, model_name: str, device: str, keyring: KeyRing,
                key: NodeKey) -> None:
    """Run the supervised warm-up once per experiment, in its own process, unless it has a base this coordinator
    (`key`) signed; only the holder of the experiment's claim calls it. A base a peer planted is warmed up over.

    A process of its own, so the supervisor never holds a CUDA context or the model's memory.
    """
    meta, refused = coordinators_base(folder, keyring, key)
    if cfg.warmup_steps == 0 or (meta is not None and meta.get("model_name") == model_name):
        return
    if newest_signed_round(folder, keyring) is not None:
        return    # the swarm already started without a base; a base now would not match its checkpoints
    if refused:
        print(f"rl-swarm: {refused}: a new one is warmed up in its place")
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    process = ctx.Process(target=start_warmup, args=(cfg, model_name, device, messages), name="warm-up", daemon=True)
    process.start()
    try:
        report = None
        target = f" accuracy {{task.fields[accuracy]}} (target {cfg.warmup_target_accuracy:.0%})" \
            if cfg.warmup_target_accuracy > 0 else ""
        with Progress(TextColumn("warm-up"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}" + target),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("warm-up", total=cfg.warmup_steps, loss="-", accuracy="-")
            while report is None:
                try:
                    kind, value = messages.get(timeout=WARMUP_SILENCE_S)
                except queues.Empty:
                    process.kill()
                    raise SwarmError(f"the warm-up said nothing for {WARMUP_SILENCE_S}s and was stopped: see "
                                     f"{folder.log_dir('supervisor')}, or set WARMUP_STEPS=0 to skip it") from None
                if kind == "step":
                    bar.update(task, completed=value[0], loss=f"{value[1]:.3f}")
                elif kind == "check":     # a WARMUP_TARGET_ACCURACY check, every few dozen steps
                    bar.update(task, accuracy=f"{value:.0%}")
                elif kind == "error":
                    process.join(timeout=10)
                    raise SwarmError(f"warm-up failed: {value}")
                else:
                    report = value
    except BaseException:       # Ctrl-C (KeyboardInterrupt) or a failure: the warm-up goes now, not at exit
        _stop(process)
        raise
    process.join(timeout=60)
    _say(report)


def _stop(process) -> None:  # noqa: ANN001 - a multiprocessing context's Process
    """The warm-up process stopped within seconds: its model and half-made base go with it (the base is written
    atomically, so none is left half-made). Left to the interpreter's exit, it is joined without a bound."""
    if process.is_alive():
        process.terminate()
        process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join(timeout=10)


def _say(report: dict) -> None:
    """The warm-up's result in a few lines: accuracy before and after, per task, the checks on the way."""
    print(f"rl-swarm: warm-up {report['steps']} steps in {report['seconds']:.0f}s: greedy exact-match "
          f"{report['greedy_accuracy_before']:.0%} -> {report['greedy_accuracy_after']:.0%}"
          f"{report.get('stop_note', '')} (base saved to {report['path']})")
    if report.get("skipped_steps"):
        print(f"rl-swarm: {report['skipped_steps']} warm-up steps skipped: their gradient was not finite")
    if len(report["by_task"]) > 1:
        print("rl-swarm: by task: " + ", ".join(f"{task} {accuracy:.0%}"
                                                 for task, accuracy in report["by_task"].items()))
    if report["checks"]:
        print("rl-swarm: checks (step: accuracy): " + ", ".join(f"{step}: {accuracy:.0%}"
                                                              for step, accuracy in report["checks"]))
