"""`rl-swarm sapo-table`: the four SAPO splits of a preset family side by side, once per seed, then the paper's
table (cumulative reward per split against the paper's), saved under <GDRIVE_PATH>/tables/."""

import math
from pathlib import Path
from typing import Callable

from configs_env import SwarmConfig, SwarmError
from configs_env.presets import PAPER_CUMULATIVE_REWARD, TABLE_FAMILIES
from swarm_supervisor.cli import EXIT_INTERRUPTED
from swarm_supervisor.preflight import (free_mib, resolve_devices, resolve_model, settle_graphs, warn_short_disk,
                                        warn_short_ram, worker_need_mib)
from swarm_supervisor.devices import CPU, DeviceFit, device_fits, gpu_count, worker_devices
from swarm_supervisor.monitor import Monitor
from swarm_supervisor.table import Arm, ArmRunner, share_warmups
from swarm_supervisor.table_report import format_cutoffs, format_table, format_task_rewards, plot_table, table_rows
from workers.shared_folder.base_meta import signed_base_meta
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import write_json_atomic
from workers.shared_folder.rejections import RejectedFile, warn_once
from workers.shared_folder.signing import KeyRing, local_key_dir
from workers.shared_folder.storage import mount_experiment

TABLE_SCHEMA = 1          # tables/<name>.json's own version
# Below this greedy exact-match after the warm-up, most groups' rewards are all 0: no spread, no update, and the
# splits' cumulative rewards differ by noise (GPT-2 124M on the paper's nine tasks: 6%, bench/LEARNING.md)
WEAK_BASE_ACCURACY = 0.2


def warmup_accuracies(arms: list[Arm], env: dict[str, str]) -> dict[int, float]:
    """Each seed's base: its greedy exact-match after the warm-up (seeds without a readable base left out)."""
    found = {}
    for arm in arms:
        if arm.seed in found:       # the seed's arms share one base: read one meta.json per seed
            continue
        cfg = arm.config(env)
        folder = ExperimentFolder(cfg.experiment_dir)
        keyring = KeyRing(folder, pins_dir=local_key_dir(cfg.cache_dir, folder.root) / "pins")
        try:        # the coordinator's word only: a peer's meta.json must not hide a weak base
            meta = signed_base_meta(folder, keyring)
        except (RejectedFile, OSError) as error:
            warn_once(f"{error}; its warm-up accuracy is left out")
            meta = None
        accuracy = meta.get("greedy_accuracy_after") if meta else None
        if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and math.isfinite(accuracy):
            found[arm.seed] = float(accuracy)
    return found


def weak_base_warning(accuracies: dict[int, float]) -> str | None:
    """One line when a seed's base answers too few questions for the splits to differ by more than noise."""
    weak = {seed: a for seed, a in sorted(accuracies.items()) if a < WEAK_BASE_ACCURACY}
    if not weak:
        return None
    return ("rl-swarm: sapo-table: the warm-up reached " + ", ".join(f"{a:.1%} (seed {s})" for s, a in weak.items())
            + f" greedy exact-match, below {WEAK_BASE_ACCURACY:.0%}: most rewards will be 0 and the splits will "
            "differ by noise; raise WARMUP_STEPS, or set TASKS to tasks the model learns "
            "(e.g. TASKS=chain_sum:1,basic_arithmetic:1)")


TEST_MODE_TABLE = (("NUM_WORKERS", "4"), ("WARMUP_BATCH_SIZE", "8"), ("EVAL_SIZE", "8"))


def run_sapo_table(cfg: SwarmConfig, env: dict[str, str], family: str | None, parallel: int,
                   report_only: bool = False) -> int:
    """`rl-swarm sapo-table`: the four splits of a preset family side by side, once per seed, then the paper's table.
    With `report_only` (`--report`), the table of what the swarms' folders hold, nothing run."""
    if parallel < 1:
        raise SwarmError(f"sapo-table --parallel {parallel}: at least one swarm runs at a time (e.g. --parallel 2)")
    family = family or ("sapo" if cfg.preset.startswith("sapo") else "paper")
    # TEST_MODE: one seed of 4-worker swarms, warmed up and evaluated on 8 questions a batch, unless the variables
    # say otherwise, so 2 CPU cores run the table in a few minutes (the paper's nine tasks have prompts of up to
    # ~370 tokens: batches of 32 were most of that time, and the tiny model learns the format from 8 all the same)
    seeds = cfg.seeds[:1] if cfg.test_mode and "SEEDS" not in env else cfg.seeds
    extra = tuple((name, value) for name, value in TEST_MODE_TABLE if name not in env) if cfg.test_mode else ()
    arms = [Arm(label=preset.split("-", 1)[1].replace("-", "/"), seed=seed,
                experiment=f"{cfg.experiment_name}-{preset}-s{seed}", env=(("PRESET", preset), *extra))
            for seed in seeds for preset in TABLE_FAMILIES[family]]
    roots = {arm.experiment: arm.config(env).experiment_dir for arm in arms}
    tables = cfg.gdrive_path / "tables"
    if report_only:
        for arm in arms:
            mount_experiment(cfg.swarm_url, roots[arm.experiment], arm.experiment)
        missing = [name for name, root in roots.items() if not ExperimentFolder(root).config_file.is_file()]
        if missing:
            raise SwarmError(f"sapo-table --report: no swarm has run for {', '.join(missing)} under "
                             f"{cfg.gdrive_path / 'experiments'}; run `rl-swarm sapo-table` with the same "
                             "GDRIVE_PATH, EXPERIMENT_NAME, PRESET and SEEDS first")
        return report(cfg, family, seeds, arms, roots, warmup_accuracies(arms, env), codes={})
    forced = ("NUM_WORKERS", "4") in extra and family == "paper"     # TEST_MODE's shape, not the user's
    warned = set()
    for arm in arms:       # every swarm's settings are checked before any starts
        for warning in arm.config(env).warnings():
            shape = forced and warning.startswith("NUM_TRANSPLANT_TREES=")
            line = (f"rl-swarm: TEST_MODE runs {family} swarms of 4 workers where the paper ran 8, so a split that "
                    "takes more groups than 3 peers publish trains every worker on the same ones (NUM_WORKERS=8 "
                    "runs the paper's shape)" if shape else f"rl-swarm: {arm.label}: {warning}")
            if line not in warned:
                print(line)
                warned.add(line)
    # every swarm's checkpoints stay on the disk after it ends: the table needs room for all of them
    model_name, _ = resolve_model(cfg)
    gpus = gpu_count()
    devices, _ = resolve_devices(cfg, gpus)
    warn_short_disk([arm.config(env) for arm in arms], model_name, on_cuda=devices[0] != CPU)
    warn_short_ram(sum(arm.config(env).num_workers for arm in arms[:parallel]), cfg, model_name,
                   on_cuda=devices[0] != CPU)
    if devices[0] != CPU:
        env = settle_table_fit(arms, env, parallel, gpus, lambda c: worker_need_mib(c, model_name, devices[0]))
    logs = tables / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"rl-swarm: sapo-table: {len(arms)} swarms ({family} presets, seeds {', '.join(map(str, seeds))}), "
          f"{parallel} at a time; logs in {logs}")
    share_warmups(arms, env, logs)
    accuracies = warmup_accuracies(arms, env)
    warning = weak_base_warning(accuracies)
    if warning:
        print(warning)
    for arm in arms:        # with SWARM_URL the swarms' records are in the bucket: read them there (progress too)
        mount_experiment(cfg.swarm_url, roots[arm.experiment], arm.experiment)
    codes = ArmRunner(arms, env, logs, parallel, stall_s=max(1800.0, 3 * cfg.coordinator_round_interval)).run()
    return report(cfg, family, seeds, arms, roots, accuracies, codes)


def settle_table_fit(arms: list[Arm], env: dict[str, str], parallel: int, gpus: int,
                     need_of: Callable[[SwarmConfig], float], monitor: Monitor | None = None) -> dict[str, str]:
    """The swarms that run at once checked against the GPUs together (each `up` alone would see the GPUs empty at its
    start, and puts its workers from cuda:0 on); UPDATE_GRAPHS=auto settled for all of them. Returns the environment
    the swarms run with; a table whose swarms do not fit even eagerly is refused in one line."""
    configs = sorted((arm.config(env) for arm in arms), key=lambda c: -c.num_workers)

    def placed(at_once: int) -> list[str]:       # the largest swarms that can run at once, each placed as its `up` does
        return [device for c in configs[:at_once] for device in worker_devices(c.device, c.num_workers, gpus)]

    at_once = min(parallel, len(configs))
    free = free_mib(sorted(set(placed(at_once))), configs[0], monitor)
    settled, need = settle_graphs(configs, placed(at_once), free, need_of)
    if any(c.update_graphs != s.update_graphs for c, s in zip(configs, settled)):
        env = {**env, "UPDATE_GRAPHS": "off"}
    configs = settled

    def unfit(at: int) -> list[DeviceFit]:
        fits = device_fits(placed(at), free, need, configs[0].memory_high_water)
        return [fit for fit in fits if fit.workers > fit.room]

    for fit in device_fits(placed(at_once), free, need, configs[0].memory_high_water):
        print(f"rl-swarm: {fit.line(need)}")
    if unfit(at_once):
        fit = unfit(at_once)[0]
        fitting = next((n for n in range(at_once - 1, 0, -1) if not unfit(n)), 0)
        fix = f"run `rl-swarm sapo-table --parallel {fitting}`" if fitting else "free memory on it"
        raise SwarmError(f"sapo-table: {at_once} swarms at once put {fit.workers} workers on {fit.device}, needing "
                         f"~{fit.workers * need / 1024:.0f} GiB, but it has {fit.free_mib / 1024:.0f} GiB free ({fix}, "
                         "or lower MAX_NEW_TOKENS / NUM_GENERATIONS)")
    return env


def report(cfg: SwarmConfig, family: str, seeds: tuple[int, ...], arms: list[Arm], roots: dict[str, Path],
           accuracies: dict[int, float], codes: dict[str, int]) -> int:
    """Print the table, save it (JSON and plot) under <GDRIVE_PATH>/tables/, and say which swarms did not finish."""
    rows = table_rows(arms, roots, cfg.cache_dir)
    # the paper's numbers under the paper's split names: a sapo-* row (4 workers) is the paper's split scaled down
    paper = PAPER_CUMULATIVE_REWARD
    print(format_table(rows, paper))
    for line in (format_cutoffs(rows), format_task_rewards(rows), weak_base_warning(accuracies)):
        if line:
            print(line)
    tables = cfg.gdrive_path / "tables"
    name = f"{cfg.experiment_name}-{family}"
    write_json_atomic(tables / f"{name}.json", {"schema": TABLE_SCHEMA, "family": family, "seeds": list(seeds),
                                                "warmup_accuracy": {str(k): v for k, v in accuracies.items()},
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
