"""The results table: the paper's columns and number formats, labels, CSV, one-line errors, a real run."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from anp_vs_tf import report

HEADER = ("| Model | Clean acc. | Adv. acc. (WB) | Adv. acc. (BB) | Vul. (WB) | Vul. (BB) | Memory | xFLOPs "
          "| Sparsity |")
RULE = "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
ANP_VS = dict(method="anp_vs", dataset="mnist", model="lenet5_caffe", clean_acc=0.99054, pgd_acc=0.91312,
              bb_acc=0.95426, vulnerability_wb=0.01734, vulnerability_bb=0.0149, memory_pct=6.814,
              flops_speedup=10.566, sparsity_pct=84.159)
ANP_VS_LINE = "| ANP-VS | 99.05 | 91.31 | 95.43 | 0.017 | 0.015 | 6.81 | 10.57 | 84.16 |"
STANDARD = dict(method="standard", dataset="mnist", model="lenet5_caffe", clean_acc=0.9929, pgd_acc=0.0,
                vulnerability_wb=0.1291, memory_pct=100.0, flops_speedup=1.0, sparsity_pct=0.0)
STANDARD_LINE = "| Standard | 99.29 | 0.00 | - | 0.129 | - | 100.00 | 1.00 | 0.00 |"


def write_run(root, name, metrics=None, text=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(text if text is not None else json.dumps(metrics))
    return str(run)


def run_report(*args, capsys):
    status = report.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_table_has_the_papers_columns_formats_and_names(tmp_path, capsys):
    runs = [write_run(tmp_path, "std", STANDARD), write_run(tmp_path, "anpvs", ANP_VS),
            write_run(tmp_path, "x", dict(method="mystery", clean_acc=0.5))]
    status, out, err = run_report(*runs, capsys=capsys)
    assert (status, err) == (0, "")
    assert out.splitlines() == [HEADER, RULE, STANDARD_LINE, ANP_VS_LINE,
                                "| mystery | 50.00 | - | - | - | - | - | - | - |"]


def test_repeated_labels_get_the_run_directory_and_labels_override(tmp_path, capsys):
    runs = [write_run(tmp_path, "seed0", ANP_VS), write_run(tmp_path / "b", "seed1", ANP_VS),
            write_run(tmp_path, "std", STANDARD)]
    _, out, _ = run_report(*runs, capsys=capsys)
    assert [line.split(" | ")[0] for line in out.splitlines()[2:]] == [
        "| ANP-VS (seed0)", "| ANP-VS (seed1)", "| Standard"]
    # Folders of the same name (a/base, b/base): the whole path tells them apart.
    bases = [write_run(tmp_path / d, "base", STANDARD) for d in "ab"]
    assert [label for label, _, _ in report.load_runs(bases)] == [f"Standard ({d})" for d in bases]
    # A metrics.json path works as well as its folder; --labels are taken verbatim, repeats included.
    _, out, _ = run_report(runs[0], os.path.join(runs[1], "metrics.json"), runs[2],
                           "--labels", "ours,ours,base", capsys=capsys)
    assert out.splitlines()[2:] == [ANP_VS_LINE.replace("ANP-VS", "ours")] * 2 + [
        STANDARD_LINE.replace("Standard", "base")]


def test_markdown_and_csv_files_hold_the_table_and_the_raw_numbers(tmp_path, capsys):
    runs = [write_run(tmp_path, "std", STANDARD), write_run(tmp_path, "anpvs", ANP_VS)]
    md, csv_path = tmp_path / "out" / "table.md", tmp_path / "out" / "table.csv"
    status, out, _ = run_report(*runs, "--markdown", md, "--csv", csv_path, capsys=capsys)
    assert status == 0
    assert md.read_text() == "\n".join([HEADER, RULE, STANDARD_LINE, ANP_VS_LINE]) + "\n"
    assert out.startswith(md.read_text()) and f"Wrote {csv_path}" in out
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["Model", "Clean acc.", "Adv. acc. (WB)", "Adv. acc. (BB)", "Vul. (WB)",
                             "Vul. (BB)", "Memory", "xFLOPs", "Sparsity", "run_dir", "dataset", "model"]
    std, anp = rows
    assert (std["Model"], std["Adv. acc. (BB)"], std["Vul. (BB)"]) == ("Standard", "", "")
    assert float(anp["Clean acc."]) == 100 * ANP_VS["clean_acc"]  # percentages, unrounded
    assert float(anp["Vul. (WB)"]) == ANP_VS["vulnerability_wb"]
    assert float(anp["xFLOPs"]) == ANP_VS["flops_speedup"]
    assert (anp["run_dir"], anp["dataset"], anp["model"]) == (runs[1], "mnist", "lenet5_caffe")
    assert not [p for p in os.listdir(md.parent) if p.startswith(".")]  # no temporary files left


def test_mixed_datasets_are_noted_under_the_table(tmp_path, capsys):
    cifar = dict(ANP_VS, dataset="cifar10", model="vgg16")
    runs = [write_run(tmp_path, "a", STANDARD), write_run(tmp_path, "b", cifar)]
    _, out, _ = run_report(*runs, capsys=capsys)
    assert out.splitlines()[4:] == [
        "Note: these runs mix datasets (cifar10, mnist); compare rows of one dataset only.",
        "Note: these runs mix models (lenet5_caffe, vgg16); compare rows of one model only."]


def test_format_table_keeps_the_pairs_experiment_py_prints():
    assert report.format_table([("anp_vs", ANP_VS)]).splitlines() == [
        HEADER, RULE, ANP_VS_LINE.replace("ANP-VS", "anp_vs")]


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("invalid", "cannot read"),
    ("list", "not an object"),
    ("string", "clean_acc is 'high', not a number"),
    ("labels", "--labels has 1 labels for 2 runs"),
    ("no_args", "required"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, case, message):
    good = write_run(tmp_path, "good", ANP_VS)
    args = {
        "missing": lambda: [good, tmp_path / "nope"],
        "invalid": lambda: [good, write_run(tmp_path, "bad", text="{not json")],
        "list": lambda: [write_run(tmp_path, "bad", text="[1, 2]")],
        "string": lambda: [write_run(tmp_path, "bad", dict(ANP_VS, clean_acc="high"))],
        "labels": lambda: [good, good, "--labels", "one"],
        "no_args": lambda: [],
    }[case]()
    out_dir = tmp_path / "out"
    status, out, err = run_report(*args, "--markdown", out_dir / "t.md", "--csv", out_dir / "t.csv",
                                  "--plots", out_dir, capsys=capsys)
    assert (status, out) == (2, "")
    assert err.startswith("anp_vs_tf.report: error: ") and message in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_the_first_layer_is_the_first_in_network_order():
    """metrics.json keeps the latent layers in network order (its keys are not sorted)."""
    metrics = dict(ANP_VS, feature_vulnerability_wb={
        "conv1_bbd": [1.0, 2.0], "conv2_bbd": [3.0], "conv10_bbd": [9.0], "dense1_bbd": [4.0]})
    series, skipped = report.first_layer_series([("ANP-VS", metrics), ("AT", ANP_VS)])
    assert skipped == ["AT"] and len(series) == 1
    assert series[0][0] == "ANP-VS (conv1_bbd)" and series[0][1].tolist() == [1.0, 2.0]


def test_plots_draw_the_first_layer_histograms(tmp_path, capsys):
    rng = np.random.default_rng(0)
    with_vectors = [write_run(tmp_path, name, dict(m, feature_vulnerability_wb={
        "conv1_bbd": rng.random(20).tolist(), "conv2_bbd": rng.random(50).tolist()}))
        for name, m in (("std", STANDARD), ("anpvs", ANP_VS))]
    without = write_run(tmp_path, "old", dict(ANP_VS, method="at"))
    status, out, _ = run_report(*with_vectors, without, "--plots", tmp_path / "plots", capsys=capsys)
    png = tmp_path / "plots" / report.PLOT_NAME
    assert status == 0 and f"Wrote {png}" in out and "AT: no feature_vulnerability_wb" in out
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert os.listdir(png.parent) == [report.PLOT_NAME]


def test_report_over_a_real_run_and_its_base(tmp_path, data_dir):
    env = {**os.environ, "ANP_VS_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "anp_vs_tf.main", "--method=anp_vs", "--pretrain_epochs=1", "--epochs=1",
         "--train_subset=600", "--test_subset=100", "--pgd_steps=2", "--step_size=0.1",
         "--eval_pgd_steps=5", f"--out_dir={run}", "--verbose=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, "-m", "anp_vs_tf.report", str(run / "base"), str(run), "--csv",
         str(tmp_path / "t.csv"), "--plots", str(tmp_path / "plots")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [HEADER, RULE]
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| Standard", "| ANP-VS"]
    assert (tmp_path / "t.csv").stat().st_size > 0
    assert "feature_vulnerability_wb" in json.loads((run / "metrics.json").read_text())
    png = tmp_path / "plots" / report.PLOT_NAME
    assert f"Wrote {png}" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 0
