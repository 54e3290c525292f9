"""`rl-swarm`: up (the whole swarm), worker (join a swarm started elsewhere), status, config."""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from configs_env import SETTINGS, SwarmConfig, SwarmError
from workers.shared_folder.folder import ExperimentFolder, FolderError, open_append, write_json_atomic
from workers.shared_folder.leftovers import pid_alive
from workers.shared_folder.exchange import read_heartbeats
from workers.learning.model import check_prompt_room, ensure_model_available, resolve_default_model
from swarm_supervisor.readable import plain
from swarm_supervisor.reports import run_validate, show_experiments, show_status
from workers.learning.tasks import check_tasks
from workers.shared_folder.protocol import SCHEMA, Status
from workers.worker import WorkerSpec

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
WARMUP_SILENCE_S = 600    # the warm-up reports every step; this long without a word means it is stuck


def shown_default(attr: str) -> str:
    """A setting's default as its variable would spell it."""
    default = getattr(SwarmConfig(), attr)
    if attr == "tasks":
        return ",".join(f"{name}:{weight:g}" for name, weight in default)
    if attr == "cache_dir":
        return "~/.cache/rl-swarm"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


def settings_markdown() -> str:
    """The README's configuration table, generated from the same SETTINGS that parse the environment."""
    lines = ["| variable | default | what it sets |", "|---|---|---|"]
    lines += [f"| `{s.env}` | `{shown_default(s.attr)}` | {s.help} |" for s in SETTINGS]
    return "\n".join(lines)


def settings_table() -> str:
    width = max(len(s.env) for s in SETTINGS)
    return "\n".join(f"  {s.env:<{width}}  {s.help} [default: {shown_default(s.attr)}]" for s in SETTINGS)


def resolve_device(requested: str) -> tuple[str, str | None]:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda:0", None
        return "cpu", "CUDA is not available: the workers run on the CPU"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SwarmError(f"DEVICE={requested}: CUDA is not available on this machine; use DEVICE=cpu or DEVICE=auto")
    return ("cuda:0" if requested == "cuda" else requested), None


def resolve_model(cfg: SwarmConfig) -> tuple[str, str | None]:
    """The model every worker loads; built or checked here once, before any process starts, with room in its
    context for the tasks' prompts and MAX_NEW_TOKENS."""
    if cfg.model_name is None:
        name, note = resolve_default_model(cfg.cache_dir)
    else:
        name, note = cfg.model_name, None
    ensure_model_available(name, cfg.cache_dir)
    check_prompt_room(name, cfg.cache_dir, cfg.tasks, cfg.max_new_tokens)
    return name, note


def check_fit(cfg: SwarmConfig, model_name: str, device: str) -> None:
    """Refuse a swarm that cannot fit on the GPU, before any worker starts, saying how many would."""
    import torch
    from transformers import AutoConfig

    from swarm_supervisor.monitor import Monitor
    from workers.learning.memory import estimate_worker_mib
    from workers.learning.hub import offline_kwargs
    from workers.learning.model import model_source, use_activation_checkpointing

    monitor = Monitor(device_index=int(device.partition(":")[2] or 0))
    snapshot = monitor.sample([])
    monitor.close()
    if snapshot.device is None:
        return                                   # no NVML: nothing to check against
    checkpointing = use_activation_checkpointing(cfg.gradient_checkpointing, torch.device(device))
    source = model_source(model_name, cfg.cache_dir)
    need = estimate_worker_mib(AutoConfig.from_pretrained(source, **offline_kwargs(source)), cfg, checkpointing)
    free = snapshot.device.free_mib * cfg.memory_high_water
    fit = int(free // need)
    print(f"rl-swarm: {device}: ~{need / 1024:.1f} GiB per worker, {snapshot.device.free_mib / 1024:.1f} GiB free: "
          f"room for {fit} workers")
    if cfg.num_workers > fit:
        raise SwarmError(f"NUM_WORKERS={cfg.num_workers} needs ~{cfg.num_workers * need / 1024:.0f} GiB but "
                         f"{device} has {snapshot.device.free_mib / 1024:.0f} GiB free: at most {fit} fit "
                         f"(set NUM_WORKERS={max(1, fit)}, or lower MAX_NEW_TOKENS / NUM_GENERATIONS)")


def worker_names(cfg: SwarmConfig) -> list[str]:
    if cfg.num_workers == 1 and cfg.node_id != "worker":
        return [cfg.node_id]
    return [f"{cfg.node_id}-{i}" for i in range(1, cfg.num_workers + 1)]


def refuse_running_nodes(folder: ExperimentFolder, cfg: SwarmConfig, nodes: list[str]) -> None:
    """Two live processes with one node id would overwrite each other's files: the second refuses to start."""
    beats = read_heartbeats(folder)
    for node in nodes:
        beat = beats.get(node)
        if beat is None or beat.age() > cfg.peer_timeout or beat.status in Status.TERMINAL:
            continue
        if beat.host == os.uname().nodename and not pid_alive(beat.pid):
            continue
        raise FolderError(f"node {node!r} is already running in experiment {cfg.experiment_name!r} "
                          f"(pid {beat.pid} on {plain(beat.host)}, heartbeat {beat.age():.0f}s ago): stop it, or pick "
                          f"another NODE_ID / EXPERIMENT_NAME")


def start(cfg: SwarmConfig, role: str, dashboard: bool = True) -> int:
    from swarm_supervisor.dashboard import Dashboard
    from swarm_supervisor.supervisor import Supervisor

    check_tasks(cfg.tasks)
    device, device_note = resolve_device(cfg.device)
    model_name, model_note = resolve_model(cfg)
    for note in (device_note, model_note, *(cfg.warnings() if role == "up" else [])):
        if note:
            print(f"rl-swarm: {note}")
    if device.startswith("cuda"):
        check_fit(cfg, model_name, device)
    folder = ExperimentFolder(cfg.experiment_dir).create()
    nodes = worker_names(cfg)
    refuse_running_nodes(folder, cfg, nodes + (["coordinator"] if role == "up" else []))
    if role == "up" and not _prepare_rounds(folder, cfg):
        return 0
    ensure_base(cfg, folder, model_name, device)
    _log_to_file(folder)
    if role == "up":
        write_json_atomic(folder.config_file, {"schema": SCHEMA, **cfg.to_json(), "model_resolved": model_name,
                                               "device_resolved": device, "started_at": time.time()})
    specs = [WorkerSpec(cfg=cfg, node=node, index=i, model_name=model_name, device=device, parent_pid=os.getpid())
             for i, node in enumerate(nodes)]
    supervisor = Supervisor(cfg, specs, run_coordinator=role == "up", model_label=model_name, device_label=device,
                            dashboard=Dashboard(shown=dashboard))
    started = time.monotonic()
    code = supervisor.run()
    print(summary(supervisor, time.monotonic() - started, code))
    if role == "up" and cfg.test_mode and code == 0:      # the seeds' validation run checks its own folder
        return run_validate(cfg, cfg.experiment_name)
    return code


def ensure_base(cfg: SwarmConfig, folder: ExperimentFolder, model_name: str, device: str) -> None:
    """Run the supervised warm-up once per experiment, in its own process, unless its base exists.

    A process of its own, so the supervisor never holds a CUDA context or the model's memory.
    """
    import queue as queues

    import torch.multiprocessing as mp
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from workers.warmup import read_base_meta, warmup_main

    meta = read_base_meta(folder.root)
    if cfg.warmup_steps == 0 or (meta is not None and meta.get("model_name") == model_name):
        return
    if folder.state_rounds():
        return    # the swarm already started without a base; a base now would not match its checkpoints
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    process = ctx.Process(target=warmup_main, args=(cfg, model_name, device, messages), name="warm-up", daemon=True)
    process.start()
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
    process.join(timeout=60)
    print(f"rl-swarm: warm-up {report['steps']} steps in {report['seconds']:.0f}s: greedy exact-match "
          f"{report['greedy_accuracy_before']:.0%} -> {report['greedy_accuracy_after']:.0%}"
          f"{report.get('stop_note', '')} (base saved to {report['path']})")


def pretrain(cfg: SwarmConfig) -> int:
    """`rl-swarm pretrain`: the warm-up alone, so a swarm (or joining machines) can start from its base."""
    from workers.warmup import read_base_meta

    if cfg.warmup_steps == 0:
        raise SwarmError("WARMUP_STEPS=0: nothing to pretrain; set WARMUP_STEPS (e.g. WARMUP_STEPS=400)")
    check_tasks(cfg.tasks)
    device, _ = resolve_device(cfg.device)
    model_name, note = resolve_model(cfg)
    if note:
        print(f"rl-swarm: {note}")
    folder = ExperimentFolder(cfg.experiment_dir).create()
    meta = read_base_meta(folder.root)
    if meta is not None and meta.get("model_name") == model_name:
        print(f"rl-swarm: {folder.root / 'base'} already holds a warmed-up {model_name} "
              f"(greedy exact-match {meta.get('greedy_accuracy_after', 0):.0%}); nothing to do")
        return 0
    if folder.state_rounds():
        raise SwarmError(f"experiment {cfg.experiment_name!r} already started without a base: its checkpoints "
                         "would not match one; pretrain a new EXPERIMENT_NAME")
    ensure_base(cfg, folder, model_name, device)
    return 0


def _prepare_rounds(folder: ExperimentFolder, cfg: SwarmConfig) -> bool:
    """False when the experiment already ran all MAX_ROUNDS; a raised MAX_ROUNDS continues it."""
    finished = folder.finished_file
    rounds = folder.state_rounds()
    if finished.exists():
        done = rounds[-1] if rounds else 0
        if done >= cfg.max_rounds:
            print(f"rl-swarm: experiment {cfg.experiment_name!r} already finished its {done} rounds; raise "
                  f"MAX_ROUNDS to continue it, or set a new EXPERIMENT_NAME")
            return False
        finished.unlink()    # only the coordinator of `up` writes it, and it is not running yet
    return True


def _log_to_file(folder: ExperimentFolder) -> None:
    """The dashboard owns the terminal; the supervisor's own log goes to logs/supervisor/."""
    log_dir = folder.supervisor_log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    # not a FileHandler: that would follow a link a peer planted at the log's name
    handler = logging.StreamHandler(os.fdopen(open_append(log_dir / "supervisor.log"), "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def summary(supervisor, wall_s: float, code: int) -> str:
    view = supervisor.reader.view(supervisor.handles)
    verdict = {0: "finished", 130: "stopped (resumable: run the same command again)"}.get(code, "FAILED")
    if code not in (0, 130) and supervisor.failure:
        verdict += f" ({supervisor.failure})"
    lines = [f"rl-swarm: {verdict}: experiment {view.experiment!r}, round {view.round}/{view.max_rounds}, "
             f"{wall_s:.1f}s, folder {supervisor.folder.root}"]
    for row in view.nodes:
        if row.role != "worker":
            continue
        reward = "-" if row.reward is None else f"{row.reward:.3f}"
        shown = [f"{v:.1%}" for v in (row.held_out_start, row.held_out) if v is not None]
        error = f" ({row.last_error})" if row.last_error else ""
        lines.append(plain(f"  {row.node_id}: {row.status}, round {row.round}, reward {reward}, held-out "
                           f"{' -> '.join(shown) or '-'}, restarts {row.restarts}{error}"))
    return "\n".join(lines)


def sapo_table(cfg: SwarmConfig, env: dict[str, str], family: str | None, parallel: int) -> int:
    """`rl-swarm sapo-table`: the four splits of a preset family side by side, once per seed, then the paper's table."""
    from configs_env.presets import PAPER_CUMULATIVE_REWARD, TABLE_FAMILIES
    from swarm_supervisor.table import Arm, ArmRunner, share_warmups
    from swarm_supervisor.table_report import format_table, format_task_rewards, plot_table, table_rows

    family = family or ("sapo" if cfg.preset.startswith("sapo") else "paper")
    # TEST_MODE: one seed of 4-worker swarms unless SEEDS / NUM_WORKERS say otherwise, so a CPU runs it in minutes
    seeds = cfg.seeds[:1] if cfg.test_mode and "SEEDS" not in env else cfg.seeds
    extra = (("NUM_WORKERS", "4"),) if cfg.test_mode and "NUM_WORKERS" not in env else ()
    arms = [Arm(label=preset.split("-", 1)[1].replace("-", "/"), seed=seed,
                experiment=f"{cfg.experiment_name}-{preset}-s{seed}", env=(("PRESET", preset), *extra))
            for seed in seeds for preset in TABLE_FAMILIES[family]]
    warned = set()
    for arm in arms:       # every swarm's settings are checked before any starts
        for warning in arm.config(env).warnings():
            if warning not in warned:
                print(f"rl-swarm: {arm.label}: {warning}")
                warned.add(warning)
    tables = cfg.gdrive_path / "tables"
    logs = tables / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"rl-swarm: sapo-table: {len(arms)} swarms ({family} presets, seeds {', '.join(map(str, seeds))}), "
          f"{parallel} at a time; logs in {logs}")
    share_warmups(arms, env, logs)
    codes = ArmRunner(arms, env, logs, parallel, stall_s=max(1800.0, 3 * cfg.coordinator_round_interval)).run()
    roots = {arm.experiment: arm.config(env).experiment_dir for arm in arms}
    rows = table_rows(arms, roots)
    paper = PAPER_CUMULATIVE_REWARD if family == "paper" else \
        dict(zip((r.label for r in rows), PAPER_CUMULATIVE_REWARD.values()))
    print(format_table(rows, paper))
    print(format_task_rewards(rows))
    name = f"{cfg.experiment_name}-{family}"
    write_json_atomic(tables / f"{name}.json", {"schema": 1, "family": family, "seeds": list(seeds),
                                                "rows": [row.to_json() for row in rows]})
    try:
        print(f"rl-swarm: table saved to {tables / (name + '.json')}, plot to "
              f"{plot_table(rows, tables / (name + '.png'))}")
    except ImportError:
        print(f"rl-swarm: table saved to {tables / (name + '.json')}; no plot (pip install -e '.[plot]')")
    failed = {n: c for n, c in codes.items() if c != 0}
    if failed:
        print("rl-swarm: not finished: " + ", ".join(f"{n} (exit {c})" for n, c in sorted(failed.items())))
    return 0 if not failed else EXIT_INTERRUPTED if set(failed.values()) == {EXIT_INTERRUPTED} else 1


def run_pack(dist: Path) -> int:
    """`rl-swarm pack`: what the Colab cell installs when it is given no PACKAGE."""
    from swarm_supervisor.pack import pack

    for path in pack(dist):
        print(f"rl-swarm: built {plain(str(path))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rl-swarm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A one-machine, many-node SAPO swarm of GPT-2 workers sharing rollouts through a folder.",
        epilog="Configuration is read from environment variables:\n" + settings_table())
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("up", help="start the coordinator and NUM_WORKERS workers (the default command)")
    worker = sub.add_parser("worker", aliases=["join"], help="start only workers, joining a swarm started elsewhere "
                                                             "on the same GDRIVE_PATH/EXPERIMENT_NAME")
    for starter in (up, worker):
        starter.add_argument("--no-dashboard", action="store_true", help="draw neither the table nor status lines "
                             "(the notebook draws the table itself, from the folder)")
    sub.add_parser("status", help="show the swarm's state read from the shared folder alone")
    sub.add_parser("pretrain", help="run the supervised warm-up now and save the experiment's base model "
                                    "(`up` does this by itself when no base exists)")
    validate = sub.add_parser("validate", help="check one experiment's folder for completeness (exit 1 on a FAIL)")
    validate.add_argument("experiment", nargs="?", help="experiment name (default: EXPERIMENT_NAME)")
    experiments = sub.add_parser("experiments", help="list or compare the experiments under GDRIVE_PATH")
    experiments.add_argument("action", choices=["list", "compare", "aggregate", "plot"])
    experiments.add_argument("names", nargs="*", help="experiments to compare (default: all)")
    experiments.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    experiments.add_argument("--out", type=Path, default=None, help="PNG path for plot "
                             "(default: <GDRIVE_PATH>/plots/<names>.png)")
    table = sub.add_parser("sapo-table", help="run the four SAPO splits side by side for each of SEEDS, then print "
                                              "the paper's table (cumulative reward, gain, held-out accuracy)")
    table.add_argument("--family", choices=["paper", "sapo"], default=None,
                       help="paper: paper-8-0 ... paper-2-6 (8 workers each); sapo: sapo-4-0 ... sapo-1-3 (4 "
                            "workers); default: from PRESET, else paper")
    table.add_argument("--parallel", type=int, default=4, help="swarms running at once (default 4: one seed's splits)")
    pack = sub.add_parser("pack", help="build a wheel and an sdist of this checkout into <GDRIVE_PATH>/dist/, "
                                       "where the Colab cell installs from")
    pack.add_argument("--dist", type=Path, default=None, help="folder for the builds (default: <GDRIVE_PATH>/dist)")
    config = sub.add_parser("config", help="print the resolved configuration")
    config.add_argument("--markdown", action="store_true", help="print the table of every setting (README)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "up"
    try:
        cfg = SwarmConfig.from_env(role="join" if command in ("worker", "join") else "up")
        if command == "config" and args.markdown:
            print(settings_markdown())
            return 0
        if command == "config":
            for key, value in cfg.to_json().items():
                print(f"{key} = {value}")
            for warning in cfg.warnings():
                print(f"warning: {warning}")
            return 0
        if command == "status":
            return show_status(cfg)
        if command == "pack":
            return run_pack(args.dist or cfg.gdrive_path / "dist")
        if command == "pretrain":
            return pretrain(cfg)
        if command == "validate":
            return run_validate(cfg, args.experiment or cfg.experiment_name)
        if command == "sapo-table":
            return sapo_table(cfg, dict(os.environ), args.family, args.parallel)
        if command == "experiments":
            return show_experiments(cfg, args.action, args.names, args.csv, args.out)
        return start(cfg, "join" if command in ("worker", "join") else "up",
                     dashboard=not getattr(args, "no_dashboard", False))
    except SwarmError as error:
        print(f"rl-swarm: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> None:
    sys.exit(main())


