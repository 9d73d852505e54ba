"""The paper-table benchmark's planner: step timing that tracing cannot skew, and an epoch
count that fits the budget (hand-computed), or one clear line when nothing fits."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "paper_table.py"


@pytest.fixture(scope="module")
def paper_table():
    spec = importlib.util.spec_from_file_location("paper_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_step_skips_tracing_and_outliers(paper_table, monkeypatch):
    # Three tracing steps of 5 s, then 0.1 s steps with one 3 s stall.
    durations = [5.0, 5.0, 5.0, 0.1, 0.1, 3.0, 0.1, 0.1]
    clock = iter([0.0] + [sum(durations[: i + 1]) for i in range(len(durations))])
    monkeypatch.setattr(paper_table.time, "perf_counter", lambda: next(clock))
    timer = paper_table._StepTimes()
    timer.on_train_begin()
    for step in range(len(durations)):
        timer.on_train_batch_end(step)
    assert timer.median_step(skip=3) == pytest.approx(0.1)
    assert timer.median_step(skip=0) == pytest.approx(3.0)  # what timing the whole fit would see


def test_plan_is_the_largest_epoch_count_within_budget(paper_table):
    per_epoch = {name: 10.0 for name in paper_table.METHODS}  # + the source trains like standard
    pgd40_pass, bnn_samples = 20.0, 10
    # By hand: 19 evaluated models x 2.4 PGD-40 passes x 20 s = 912 s of evaluation, plus
    # 11 models x 70 s of overhead = 1682 s; one epoch of all 11 models = 110 s;
    # (7200 / 1.08 - 1682) / 110 = 45.3 -> 45 epochs.
    assert (paper_table.PER_MODEL_S, paper_table.SAFETY) == (70.0, 1.08)
    epochs = paper_table.plan_epochs(7200.0, per_epoch, pgd40_pass, bnn_samples)
    assert epochs == 45
    spent = (epochs * 110.0 + 1682.0) * paper_table.SAFETY
    assert spent <= 7200.0 < ((epochs + 1) * 110.0 + 1682.0) * paper_table.SAFETY


def test_a_budget_without_room_for_one_epoch_says_what_to_do(paper_table):
    per_epoch = {name: 100.0 for name in paper_table.METHODS}
    with pytest.raises(SystemExit, match="raise --budget_minutes or use --train_subset"):
        paper_table.plan_epochs(600.0, per_epoch, 20.0, 10)


def test_a_subset_of_methods_plans_for_those_only(paper_table):
    methods = ("standard", "at", "anp", "anp_vs")
    per_epoch = {name: 60.0 for name in methods}
    # By hand: 4 models x 2.4 passes x 100 s (no AT BNN draws) = 960 s, 5 x 70 s of
    # overhead = 350 s; one epoch of the 4 and the source = 300 s;
    # (7200 / 1.08 - 1310) / 300 = 17.855 -> 17 epochs.
    assert paper_table.plan_epochs(7200.0, per_epoch, 100.0, 10, methods) == 17


@pytest.mark.parametrize("argv, message", [
    (["--methods", "at,nope"], "unknown nope"),
    (["--methods", "anp_vs"], "start from the standard model; add standard"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--dataset", "mnist", "--model", "resnet20"], "expects 32x32x3 images"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(paper_table, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        paper_table.main(argv + ["--out_dir", "/nonexistent/never/written"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
