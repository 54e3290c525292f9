"""`rl-swarm`: up (the whole swarm), worker (join a swarm started elsewhere), status, config."""

import argparse
import faulthandler
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from configs_env import SETTINGS, Setting, SwarmConfig, SwarmError
from configs_env.parsing import spelled
from swarm_supervisor.devices import CPU, devices_label, gpu_count
from swarm_supervisor.preflight import (check_gdrive_path, check_writable_folder, resolve_devices, settle_fit,
                                        resolve_model, warn_short_disk, warn_short_ram, worker_names,
                                        worker_need_mib)
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.recorded_config import write_recorded_config
from swarm_supervisor.resume import Resume, finished_note, plan_resume, refuse_past_max_rounds
from workers.shared_folder.rejections import FolderError, RejectedFile
from workers.shared_folder.retries import with_retries
from workers.shared_folder.appends import open_append
from workers.shared_folder.safe_io import is_visible, remove_file
from workers.shared_folder.leftovers import pid_alive
from workers.shared_folder.storage import mount_experiment
from workers.shared_folder.exchange import newest_signed_round, read_heartbeats
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey, fingerprint, local_key_dir
from swarm_supervisor.readable import plain
from swarm_supervisor.reports import run_validate, show_experiments, show_status, summary
from workers.shared_folder.protocol import Status
from workers.processes import WorkerSpec, joined_index, skip_exit_collections
from swarm_supervisor.base_warmup import coordinators_base, ensure_base
from swarm_supervisor.claim import CoordinatorClaim, coordinator_key
from swarm_supervisor.join import SettingsWatch, join_experiment, refuse_finished

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def shown_default(attr: str) -> str:
    """A setting's default as its variable would spell it."""
    if attr == "cache_dir":
        return "~/.cache/rl-swarm"
    return spelled(getattr(SwarmConfig(), attr))


UNSET = re.compile(r"unset: ([^);]*)")


def resolved_settings(cfg: SwarmConfig) -> str:
    """`rl-swarm config`: each variable as a run takes it; one left to rl-swarm says what it resolves to."""
    lines = []
    for s in SETTINGS:
        value = getattr(cfg, s.attr)
        lines.append(plain(f"{s.env} = {without(s) if value is None else spelled(value)}"))
    return "\n".join(lines)


def without(setting: Setting) -> str:
    """What a run does without the variable, as its help line says ("unset: ..."; LEARNING_RATE's depends on the
    model), or "unset"."""
    said = UNSET.search(setting.help)
    if said is None:
        return "unset"
    return "off" if said[1] == "off" else f"auto: {said[1]}"


def settings_markdown() -> str:
    """The README's configuration table, generated from the same SETTINGS that parse the environment."""
    lines = ["| variable | default | what it sets |", "|---|---|---|"]
    lines += [f"| `{s.env}` | `{shown_default(s.attr)}` | {s.help} |" for s in SETTINGS]
    return "\n".join(lines)


def settings_table() -> str:
    width = max(len(s.env) for s in SETTINGS)
    return "\n".join(f"  {s.env:<{width}}  {s.help} [default: {shown_default(s.attr)}]" for s in SETTINGS)


def refuse_running_nodes(folder: ExperimentFolder, cfg: SwarmConfig, nodes: list[str], keyring: KeyRing) -> None:
    """Two live processes with one node id would overwrite each other's files: the second refuses to start."""
    beats = read_heartbeats(folder, keyring)
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
    from workers.learning.tasks import check_tasks      # reasoning-gym loads only when a swarm starts

    keyring = watch = None
    if role != "up":        # before the tasks and the model load: they are the experiment's
        cfg, keyring, watch = join_experiment(cfg)
    check_tasks(cfg.tasks)
    gpus = gpu_count()
    devices, device_note = resolve_devices(cfg, gpus)
    model_name, model_note = resolve_model(cfg)
    for note in (device_note, model_note, *(cfg.warnings() if role == "up" else [])):
        if note:
            print(f"rl-swarm: {note}")
    need_mib = None
    if devices[0] != CPU:
        cfg, need_mib = settle_fit(cfg, gpus, lambda settings: worker_need_mib(settings, model_name, devices[0]))
    warn_short_disk([cfg], model_name, on_cuda=devices[0] != CPU)
    warn_short_ram(cfg.num_workers, cfg, model_name, on_cuda=devices[0] != CPU)
    folder = ExperimentFolder(cfg.experiment_dir).create()
    if keyring is not None:
        return _run_swarm(cfg, folder, model_name, devices, keyring, dashboard=dashboard, need_mib=need_mib,
                          watch=watch)
    key, keyring = coordinator_key(cfg, folder)
    claim = CoordinatorClaim(cfg, folder, key, keyring, "up")
    with claim.held():       # before the warm-up: a second `up` is refused while this one warms up too
        print(f"rl-swarm: coordinator key {key.fingerprint} (a machine that joins prints the key it pinned: "
              "check that they match)")
        return _run_swarm(cfg, folder, model_name, devices, keyring, claim, dashboard=dashboard, need_mib=need_mib)


def finished_before_start(cfg: SwarmConfig) -> str | None:
    """Why `up` has no round to run (one line, exit 0), or a ConfigError for a MAX_ROUNDS below the round a stopped
    run reached: told before anything is written (the folder's write check, the claim) and before the device's and
    the model's notes. _prepare_rounds asks again under the claim."""
    folder = ExperimentFolder(cfg.experiment_dir)
    finished = is_visible(folder.finished_file)
    if not finished and not is_visible(folder.round_state_file(1)):       # a new experiment
        return None
    key, keyring = coordinator_key(cfg, folder)
    try:
        published = KeyRing(folder).public_key(COORDINATOR)
    except (RejectedFile, OSError):     # none, a bad one, or a Drive hiccup: the claim publishes it or says why not
        return None
    if fingerprint(published) != key.fingerprint:      # another coordinator's experiment: the claim refuses it
        return None
    if finished and (note := finished_note(folder, keyring, cfg)) is not None:
        return note
    try:
        newest = with_retries(lambda: newest_signed_round(folder, keyring), f"listing {folder.state_dir}")
    except OSError:         # the Drive away past the retries: the claim's own check asks again
        return None
    if newest is not None:
        refuse_past_max_rounds(newest, cfg)
    return None


def _run_swarm(cfg: SwarmConfig, folder: ExperimentFolder, model_name: str, devices: list[str], keyring: KeyRing,
               claim: CoordinatorClaim | None = None, dashboard: bool = True, need_mib: float | None = None,
               watch: SettingsWatch | None = None) -> int:
    """The supervisor with this machine's workers, and the coordinator when `claim` holds the experiment (else
    `watch` follows its settings); dashboard=False: status lines only (a notebook draws the table itself)."""
    from swarm_supervisor.dashboard import Dashboard
    from swarm_supervisor.supervisor import Supervisor

    nodes = worker_names(cfg)
    refuse_running_nodes(folder, cfg, nodes, keyring)
    resume = None
    if claim is not None:
        if (resume := _prepare_rounds(folder, cfg, keyring, model_name)) is None:
            return 0
        for line in resume.lines(cfg):
            print(f"rl-swarm: {line}")
        ensure_base(cfg, folder, model_name, devices[0], keyring, claim.key)
    joined_as = None if claim is not None else cfg.node_id
    _log_to_file(folder.supervisor_dir(joined_as))
    if claim is not None and resume is not None:
        write_recorded_config(folder, resume.record(cfg, model_name, devices_label(devices), claim.lease.instance),
                              claim.key)
    publish_worker_keys(cfg, folder, nodes, keyring)
    specs = [WorkerSpec(cfg=cfg, node=node, index=i if claim is not None else joined_index(node), model_name=model_name,
                        device=device, parent_pid=os.getpid()) for i, (node, device) in enumerate(zip(nodes, devices))]
    supervisor = Supervisor(cfg, specs, run_coordinator=claim is not None, model_label=model_name,
                            device_label=devices_label(devices), keyring=keyring, coordinator_key=claim and claim.key,
                            claim_lost=lambda: claim and claim.lost, dashboard=Dashboard(shown=dashboard),
                            worker_need_mib=need_mib, joined_as=joined_as,
                            settings_changed=watch.look if watch else lambda cfg: None)
    started = time.monotonic()
    code = supervisor.run()
    print(summary(supervisor, time.monotonic() - started, code))
    if claim is not None and cfg.test_mode and code == 0:      # the seeds' validation run checks its own folder
        return run_validate(cfg, cfg.experiment_name)
    return code


def publish_worker_keys(cfg: SwarmConfig, folder: ExperimentFolder, nodes: list[str], keyring: KeyRing) -> None:
    """Each local worker's key made and published before any starts, so its first record is already trusted
    and a NODE_ID another machine holds is refused here, in one line, not in a worker's log."""
    key_dir = local_key_dir(cfg.cache_dir, folder.root)
    for node in nodes:
        key = NodeKey.load_or_create(key_dir, node)
        with_retries(lambda key=key: keyring.publish(key), f"publishing the public key of {node}")


def pretrain(cfg: SwarmConfig) -> int:
    """`rl-swarm pretrain`: the warm-up alone, so a swarm (or joining machines) can start from its base."""
    from workers.learning.tasks import check_tasks

    if cfg.warmup_steps == 0:
        raise SwarmError("WARMUP_STEPS=0: nothing to pretrain; set WARMUP_STEPS (e.g. WARMUP_STEPS=400)")
    check_tasks(cfg.tasks)
    device = resolve_devices(cfg.with_overrides(num_workers=1), gpu_count())[0][0]
    model_name, note = resolve_model(cfg)
    if note:
        print(f"rl-swarm: {note}")
    folder = ExperimentFolder(cfg.experiment_dir).create()
    key, keyring = coordinator_key(cfg, folder)
    with CoordinatorClaim(cfg, folder, key, keyring, "pretrain").held():    # no `up` warms up beside it
        meta, _ = coordinators_base(folder, keyring, key)
        if meta is not None and meta.get("model_name") == model_name:
            print(f"rl-swarm: {folder.root / 'base'} already holds a warmed-up {model_name} "
                  f"(greedy exact-match {meta.get('greedy_accuracy_after', 0):.0%}); nothing to do")
            return 0
        if newest_signed_round(folder, keyring) is not None:
            raise SwarmError(f"experiment {cfg.experiment_name!r} already started without a base: its checkpoints "
                             "would not match one; pretrain a new EXPERIMENT_NAME")
        ensure_base(cfg, folder, model_name, device, keyring, key)
    return 0


def _prepare_rounds(folder: ExperimentFolder, cfg: SwarmConfig, keyring: KeyRing, model_name: str) -> Resume | None:
    """How the rounds start (a new experiment's Resume has round 0); None when the experiment already ran all
    MAX_ROUNDS (its coordinator's signed finished.json says so). A raised MAX_ROUNDS continues it, and a
    finished.json it did not sign is removed, once the resume is known to be coherent (ConfigError otherwise)."""
    note = finished_note(folder, keyring, cfg)
    if note is not None:
        print(f"rl-swarm: {note}")
        return None
    resume = plan_resume(folder, keyring, cfg, model_name)
    remove_file(folder.finished_file)    # only this coordinator writes it, and it is not running yet
    return resume


def _log_to_file(log_dir: Path) -> None:
    """The dashboard owns the terminal; the supervisor's own log goes to its folder under logs/."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # not a FileHandler: that would follow a link a peer planted at the log's name
    handler = logging.StreamHandler(os.fdopen(open_append(log_dir / "supervisor.log"), "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


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
    # optional, with `list` its default: argparse calls a positional `names` of nargs="*" missing too when a
    # required `action` before it is
    experiments.add_argument("action", nargs="?", default="list", choices=["list", "compare", "aggregate", "plot"],
                             help="what to show (default: list)")
    experiments.add_argument("names", nargs="*", help="experiments to compare or plot (default: all)")
    experiments.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    experiments.add_argument("--out", type=Path, default=None, help="PNG path for plot "
                             "(default: <GDRIVE_PATH>/plots/<names>.png)")
    table = sub.add_parser("sapo-table", help="run the four SAPO splits side by side for each of SEEDS, then print "
                                              "the paper's table (cumulative reward, gain, held-out accuracy)")
    table.add_argument("--family", choices=["paper", "sapo"], default=None,
                       help="paper: paper-8-0 ... paper-2-6 (8 workers each); sapo: sapo-4-0 ... sapo-1-3 (4 "
                            "workers); default: from PRESET, else paper")
    table.add_argument("--parallel", type=int, default=4, help="swarms running at once (default 4: one seed's splits)")
    table.add_argument("--report", action="store_true", help="print and save the table of what the swarms' folders "
                       "hold (a table stopped early: its splits compared over the rounds all reached); run nothing")
    pack = sub.add_parser("pack", help="build a wheel and an sdist of this checkout into <GDRIVE_PATH>/dist/, "
                                       "where the Colab cell installs from")
    pack.add_argument("--dist", type=Path, default=None, help="folder for the builds (default: <GDRIVE_PATH>/dist)")
    config = sub.add_parser("config", help="print the resolved configuration")
    config.add_argument("--markdown", action="store_true", help="print the table of every setting (README)")
    return parser


def check_written_folders(command: str, args: argparse.Namespace, cfg: SwarmConfig) -> None:
    """Each command that writes under GDRIVE_PATH (or --dist, --out) checks it once, before anything starts: a file,
    a folder it cannot write, or a missing one it could not make is one line naming it, not a traceback. A missing
    one is made where it always was, by the command's first write."""
    if command in ("up", "pretrain", "worker", "join"):
        check_gdrive_path(cfg, experiment=True)
    elif command == "sapo-table":
        check_gdrive_path(cfg)
    elif command == "pack":            # <GDRIVE_PATH>/dist unless --dist says where
        if args.dist is None:
            check_gdrive_path(cfg)
        else:
            check_writable_folder("--dist", args.dist, "give --dist a folder this machine can write")
    elif command == "experiments" and args.action == "plot":       # <GDRIVE_PATH>/plots unless --out says where
        if args.out is None:
            check_gdrive_path(cfg)
        else:
            check_writable_folder("--out's folder", args.out.parent, "give --out a path this machine can write")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "up"
    try:
        cfg = SwarmConfig.from_env(role="join" if command in ("worker", "join") else "up")
        mount_experiment(cfg.swarm_url, cfg.experiment_dir, cfg.experiment_name)
        if command == "up" and (note := finished_before_start(cfg)) is not None:
            print(f"rl-swarm: {note}")
            return 0
        if command in ("worker", "join"):     # before the write check's probe file: nothing lands in a finished one
            refuse_finished(cfg)
        check_written_folders(command, args, cfg)
        if command == "config" and args.markdown:
            print(settings_markdown())
            return 0
        if command == "config":
            print(resolved_settings(cfg))
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
            from swarm_supervisor.sapo_table import run_sapo_table

            return run_sapo_table(cfg, dict(os.environ), args.family, args.parallel, args.report)
        if command == "experiments":
            return show_experiments(cfg, args.action, args.names, args.csv, args.out)
        return start(cfg, "join" if command in ("worker", "join") else "up",
                     dashboard=not getattr(args, "no_dashboard", False))
    except SwarmError as error:
        print(f"rl-swarm: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:      # before a supervisor took over Ctrl-C: in the warm-up, or while starting
        print("rl-swarm: stopped by Ctrl-C before the swarm's rounds began; nothing was lost: the same command "
              "starts again (a warm-up cut short starts over)", file=sys.stderr)
        return EXIT_INTERRUPTED


def stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a stuck process is. For a
    process's entry point only (a stderr without a file descriptor, as under a test's capture, has none)."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def entry() -> None:
    stacks_on_sigusr1()
    code = main()
    skip_exit_collections()     # `up` and `pretrain` loaded torch and transformers
    sys.exit(code)


