"""The experiment views on a small finished experiment: across seeds the mean and its 95% Student-t interval,
checked by hand; held-out accuracy in compare, validate and the plot; and the read-only commands answering
without loading the learning code."""

import re
import subprocess
import sys

import pytest

from swarm_supervisor.experiments import mean_interval


def test_mean_interval_by_hand():
    mean, half = mean_interval([1.0, 2.0, 3.0])           # sd 1, t(0.975, 2) = 4.30
    assert mean == 2.0 and half == pytest.approx(4.30 / 3 ** 0.5)
    assert mean_interval([0.5]) == (0.5, None)            # one run: no interval


def _experiment(root, with_evals: bool):
    """Two workers, two rounds; worker-1's round 1 is a line written before the newer metrics existed."""
    import json
    import time

    from tests.helpers import append_as, write_as
    from workers.shared_folder.held_out import eval_file
    from workers.shared_folder.folder import ExperimentFolder
    from workers.shared_folder.protocol import HeldOutEval, RoundMetrics, RoundState

    folder = ExperimentFolder(root).create()
    write_as(folder, "coordinator", folder.config_file, {"schema": 1, "max_rounds": 2, "num_train_samples": 2,
                                                         "num_transplant_trees": 2, "num_generations": 4,
                                                         "num_workers": 2, "model_resolved": "rl-swarm/tiny-gpt2",
                                                         "eval_size": 32})
    for round_ in (1, 2):
        write_as(folder, "coordinator", folder.round_state_file(round_),
                 RoundState(round_, 2, time.time(), "test").to_json())
    write_as(folder, "coordinator", folder.finished_file, {"schema": 1, "rounds": 2, "finished_at": time.time()})
    for node in ("worker-1", "worker-2"):
        for round_ in (1, 2):
            row = RoundMetrics(node=node, round=round_, reward_mean=0.5, accuracy=0.25, loss=0.1, local_groups=2,
                               external_groups=2, external_available=2, zero_advantage_groups=0, completions=8,
                               mean_completion_tokens=5.0, generate_s=1.0, fetch_s=0.1, train_s=0.2, round_s=1.3,
                               reward_std=0.1, grad_norm=0.5, learning_rate=1e-5, score_s=0.01).to_json()
            if node == "worker-1" and round_ == 1:
                row = {k: v for k, v in row.items() if k not in ("reward_std", "grad_norm", "learning_rate",
                                                                  "score_s", "reward_max", "format_rate", "kl",
                                                                  "max_completion_tokens", "clip_fraction")}
            append_as(folder, node, folder.metrics_file(node), row)
        if with_evals:
            start, end = (0.1, 0.3) if node == "worker-1" else (0.2, 0.4)
            for round_, accuracy in ((0, start), (2, end)):
                append_as(folder, node, eval_file(folder, node), HeldOutEval(node, round_, accuracy, 32, 1.0).to_json())
    assert json.loads(folder.metrics_file("worker-1").read_text().splitlines()[0]).get("grad_norm", "absent") == \
        "absent"
    return folder


def test_compare_shows_held_out_accuracy_and_reads_metrics_lines_from_before_it(tmp_path):
    from swarm_supervisor.experiments import aggregate, summaries_csv, summarize
    from swarm_supervisor.validation import validate

    _experiment(tmp_path / "run", with_evals=True)
    summary = summarize(tmp_path / "run", None)
    assert summary.rejected_files == 0 and summary.cumulative_reward == pytest.approx(1.0)   # old line read
    assert summary.held_out_start == pytest.approx(0.15) and summary.held_out_final == pytest.approx(0.35)
    assert "held_out_start,held_out_final" in summaries_csv([summary]).splitlines()[0]
    [check] = [c for c in validate(tmp_path / "run", None) if c.name == "held-out evaluations"]
    assert check.passed and "after the last round" in check.detail
    [row] = aggregate([tmp_path / "run"], None)
    assert row.held_out_final == (pytest.approx(0.35), None)


def test_validate_names_the_worker_whose_held_out_evaluations_are_missing(tmp_path):
    from swarm_supervisor.experiments import summarize
    from swarm_supervisor.validation import validate

    folder = _experiment(tmp_path / "run", with_evals=False)
    assert summarize(folder.root, None).held_out_final is None
    [check] = [c for c in validate(folder.root, None) if c.name == "held-out evaluations"]
    assert not check.passed and "worker-1: none before round 1" in check.detail
    assert "worker-1: none after the last round 2" in check.detail


def test_the_plot_draws_held_out_accuracy_beside_training_accuracy(tmp_path, monkeypatch):
    import matplotlib.figure

    from swarm_supervisor.experiments import plot_experiments

    drawn: dict[str, list] = {}
    save = matplotlib.figure.Figure.savefig

    def keep_lines(figure, *args, **kwargs):
        drawn.update({line.get_label(): list(line.get_xdata()) for ax in figure.axes for line in ax.lines})
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_lines)
    _experiment(tmp_path / "run", with_evals=True)
    out = plot_experiments([tmp_path / "run"], tmp_path / "plot.png", None)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["run held-out"] == [0, 2]                  # the start and the end evaluation


def test_restarts_are_counted_from_the_events_kind_and_from_older_sentences(tmp_path):
    from swarm_supervisor.machines import count_restarts
    from workers.shared_folder.folder import ExperimentFolder
    from workers.shared_folder.jsonl import append_jsonl

    folder = ExperimentFolder(tmp_path).create()
    for row in ({"time": 1, "event": "worker-1: restarting from its last checkpoint (restart 1)"},     # older file
                {"time": 2, "event": "w-2: back", "level": "info", "kind": "restart", "node": "w-2"},
                {"time": 3, "event": "worker-3 said 'restarting from its last checkpoint'", "kind": "unlearning"},
                {"time": 4, "event": "started 2 workers", "level": "info"}):
        append_jsonl(folder.events_file, row)
    assert count_restarts(folder) == 2


def test_rl_swarm_experiments_without_an_action_lists_them(tmp_path, monkeypatch, capsys):
    """It once said `required: action, names`, though listing needs no names."""
    from swarm_supervisor.cli import main

    _experiment(tmp_path / "drive" / "experiments" / "e2e", with_evals=False)
    monkeypatch.setenv("GDRIVE_PATH", str(tmp_path / "drive"))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert "e2e" in out and "finished" in out and "2/2" in out


def test_experiments_tell_of_unreadable_files_in_one_line_naming_each_experiment(tmp_path, monkeypatch, capsys):
    """`experiments list` printed a line for every bad file of every experiment, some not saying whose
    (`metrics/worker-2/metrics.jsonl line 26: not valid JSON`); comparing one experiment says nothing of another."""
    from swarm_supervisor.cli import main

    experiments = tmp_path / "drive" / "experiments"
    _experiment(experiments / "good", with_evals=False)
    for name in ("hostile1", "hostile2"):
        folder = _experiment(experiments / name, with_evals=False)
        with open(folder.metrics_file("worker-2"), "a") as log:
            log.write("not json\n[]\n")
        (folder.peers_dir / "evil.json").write_text("{'a'")
    monkeypatch.setenv("GDRIVE_PATH", str(tmp_path / "drive"))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["experiments", "list"]) == 0
    # (the test's signing keys sit beside each experiment, in folders no coordinator wrote to: named on a line apart)
    said = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("rl-swarm: not listed:")]
    assert said == [
        "rl-swarm: unreadable files or lines skipped, by experiment: hostile1 3, hostile2 3 (`rl-swarm validate "
        "<experiment>` names them)"]
    assert main(["experiments", "compare", "good"]) == 0
    assert capsys.readouterr().err == ""


# what `up` and `pretrain` need, and a read-only command never does: torch alone takes ~1.2 s of CPU to import
LEARNING_MODULES = ("torch", "transformers", "reasoning_gym")


def test_status_experiments_validate_and_config_answer_without_loading_torch(tmp_path):
    from tests.helpers import swarm_env

    _experiment(tmp_path / "drive" / "experiments" / "e2e", with_evals=True)
    for command in (["--help"], ["status"], ["experiments", "list"], ["validate", "e2e"], ["config"]):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "swarm_supervisor", *command],
                                env=swarm_env(tmp_path, COLUMNS="200"), capture_output=True, text=True, timeout=120)
        # 1: validate's FAILs, of a folder that holds no checkpoints or logs
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stdout + result.stderr
        imported = re.findall(r"^import time:.*\|\s+(\S+)$", result.stderr, re.MULTILINE)
        loaded = [name for name in LEARNING_MODULES if name in imported]
        assert not loaded, f"`rl-swarm {' '.join(command)}` imported {', '.join(loaded)}: it starts seconds slower"
