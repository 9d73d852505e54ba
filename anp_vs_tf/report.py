"""The paper's results table (Tables 1-3) from the metrics.json of finished runs.

    python -m anp_vs_tf.report RUN_DIR [RUN_DIR ...] [--markdown PATH] [--csv PATH]
                               [--plots DIR] [--labels L1,L2,...]

stdout: the Markdown table (plus a note when the runs mix datasets or models, also written to
--markdown), then one line per file written or run left out of the plot. Bad input: a single
"anp_vs_tf.report: error: ..." line on stderr and exit status 2, before any file is written.
"""
import argparse
import csv
import io
import json
import numbers
import os
import sys

from anp_vs_tf.files import atomic_write, write_text

PROG = "anp_vs_tf.report"

# (title, metrics key, Markdown format). Accuracies are stored as fractions and shown as percentages.
COLUMNS = (
    ("Clean acc.", "clean_acc", lambda v: f"{100 * v:.2f}"),
    ("Adv. acc. (WB)", "pgd_acc", lambda v: f"{100 * v:.2f}"),
    ("Adv. acc. (BB)", "bb_acc", lambda v: f"{100 * v:.2f}"),
    ("AA", "aa_acc", lambda v: f"{100 * v:.2f}"),
    ("Vul. (WB)", "vulnerability_wb", lambda v: f"{v:.3f}"),
    ("Vul. (BB)", "vulnerability_bb", lambda v: f"{v:.3f}"),
    ("Memory", "memory_pct", lambda v: f"{v:.2f}"),
    ("xFLOPs", "flops_speedup", lambda v: f"{v:.2f}"),
    ("Sparsity", "sparsity", lambda v: f"{v:.2f}"),
)
PERCENT_KEYS = {"clean_acc", "pgd_acc", "bb_acc", "aa_acc"}

# The paper's names for the methods (Tables 1-3 and the ablation).
PAPER_NAMES = {
    "standard": "Standard", "bp": "BP", "at": "AT", "at_vs": "AT-VS", "anp": "ANP",
    "anp_vs": "ANP-VS", "pre_at": "Pretrained AT", "trades": "TRADES", "admm": "ADMM",
    "at_bnn": "AT BNN",
}
PLOT_NAME = "feature_vulnerability_first_layer.png"


def value(metrics, key):
    """A column's number: the metric itself, except "sparsity", which is the percent of units
    pruned, or of weights for a method that prunes single weights (ADMM), as in the paper."""
    if key == "sparsity":
        key = "weight_sparsity_pct" if metrics.get("pruning") == "weights" else "sparsity_pct"
    return metrics.get(key)


class ReportError(Exception):
    """Bad input; main() prints it as one line and exits with status 2."""


def _row(row):
    """(label, metrics) or (label, metrics, run_dir): experiment.py passes pairs, load_runs triples."""
    label, metrics = row[0], row[1]
    return label, metrics, row[2] if len(row) > 2 else ""


def load_runs(paths, labels=None):
    """[(label, metrics, run_dir)] in the order given; raises ReportError on anything unusable.

    Labels are `labels` verbatim when given, else the paper's method names, with the run
    directory's name appended to labels that would otherwise repeat.
    """
    if labels is not None and len(labels) != len(paths):
        raise ReportError(f"--labels has {len(labels)} labels for {len(paths)} runs.")
    runs = []
    for path in paths:
        file = path if os.path.isfile(path) else os.path.join(path, "metrics.json")
        run_dir = os.path.dirname(os.path.abspath(file))
        try:
            with open(file) as f:
                metrics = json.load(f)
        except FileNotFoundError:
            raise ReportError(f"{file} does not exist; pass a run directory holding metrics.json.")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ReportError(f"cannot read {file}: {e}")
        if not isinstance(metrics, dict):
            raise ReportError(f"{file} holds a JSON {type(metrics).__name__}, not an object of metrics.")
        for _, key, _ in COLUMNS:
            number = value(metrics, key)
            if number is not None and (isinstance(number, bool) or not isinstance(number, numbers.Real)):
                raise ReportError(f"{file}: {key} is {number!r}, not a number.")
        runs.append((metrics, run_dir))
    if labels is not None:
        return [(label, m, d) for label, (m, d) in zip(labels, runs)]
    names = [PAPER_NAMES.get(m.get("method"), str(m.get("method", "?"))) for m, _ in runs]
    out = []
    for name, (metrics, run_dir) in zip(names, runs):
        if names.count(name) > 1:  # the folder's name; its whole path if that repeats too (a/base, b/base)
            tags = [os.path.basename(d) for n, (_, d) in zip(names, runs) if n == name]
            tag = os.path.basename(run_dir)
            name = f"{name} ({tag if tags.count(tag) == 1 else run_dir})"
        out.append((name, metrics, run_dir))
    return out


OPTIONAL_KEYS = {"aa_acc"}  # columns shown only when some run measured them (--autoattack)


def _columns(rows):
    """COLUMNS, without the optional ones that no row has."""
    present = {key for row in rows for key in OPTIONAL_KEYS if value(_row(row)[1], key) is not None}
    return [column for column in COLUMNS if column[1] not in OPTIONAL_KEYS or column[1] in present]


def format_table(rows):
    """Markdown, the paper's column order, a row per (label, metrics[, run_dir]); '-' if missing.
    The AA column (AutoAttack's robust accuracy) is there when some row has it."""
    columns = _columns(rows)
    header = ["Model"] + [title for title, _, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        label, metrics, _ = _row(row)
        cells = [str(label).replace("|", "\\|")] + [
            "-" if value(metrics, key) is None else fmt(value(metrics, key)) for _, key, fmt in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(rows):
    """CSV text: the table's columns unrounded, then run_dir, dataset, model; empty cell if missing.

    Accuracies are percentages (100 x the stored fraction), like the Markdown table, so both read
    the same; the other columns are the stored numbers.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = _columns(rows)
    writer.writerow(["Model"] + [title for title, _, _ in columns] + ["run_dir", "dataset", "model"])
    for row in rows:
        label, metrics, run_dir = _row(row)
        values = []
        for _, key, _ in columns:
            v = value(metrics, key)  # None: absent, e.g. black-box metrics of older runs
            values.append("" if v is None else repr(float(100 * v if key in PERCENT_KEYS else v)))
        writer.writerow([label] + values + [run_dir, metrics.get("dataset", ""), metrics.get("model", "")])
    return buf.getvalue()


def mix_notes(rows):
    """Lines warning that rows come from different datasets or models: such rows rarely compare."""
    notes, all_metrics = [], [_row(r)[1] for r in rows]
    for key, what in (("dataset", "datasets"), ("model", "models")):
        seen = sorted({str(m[key]) for m in all_metrics if m.get(key) is not None})
        if len(seen) > 1:
            notes.append(f"Note: these runs mix {what} ({', '.join(seen)}); compare rows of one {key} only.")
    return notes


def first_layer_series(rows):
    """([(label, first layer's per-feature vulnerability)], [labels of runs without it])."""
    import numpy as np

    series, skipped = [], []
    for row in rows:
        label, metrics, _ = _row(row)
        layers = metrics.get("feature_vulnerability_wb")
        if not layers:
            skipped.append(label)
            continue
        first = next(iter(layers))  # metrics.json keeps the layers in network order
        series.append((f"{label} ({first})", np.asarray(layers[first], dtype=float).ravel()))
    return series, skipped


def plot_first_layer(rows, folder):
    """The paper's figure of input-layer feature vulnerability: returns the PNG path, or None."""
    series, skipped = first_layer_series(rows)
    for label in skipped:
        print(f"{label}: no feature_vulnerability_wb in metrics.json; left out of the plot.")
    if not series:
        return None
    try:
        from anp_vs_tf import plots  # lazily: matplotlib is only needed for --plots
    except ImportError as e:
        raise ReportError(f"--plots needs anp_vs_tf.plots and matplotlib: {e}")

    path = os.path.join(folder, PLOT_NAME)
    # No suptitle: plots.py's overlaps the two-line panel titles; the panels and file name say enough.
    atomic_write(path, lambda tmp: plots.plot_vulnerability_histograms(series, tmp))
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage + error
        raise ReportError(message)


def main(argv=None):
    """The CLI; returns the exit status (0, or 2 on bad input)."""
    parser = _Parser(prog=PROG, description="The paper's results table from run directories.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory or its metrics.json")
    parser.add_argument("--markdown", metavar="PATH", help="also write the Markdown table here")
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV (unrounded) here")
    parser.add_argument("--plots", metavar="DIR", help=f"draw {PLOT_NAME} here")
    parser.add_argument("--labels", help="comma-separated row labels, one per run")
    try:
        args = parser.parse_args(argv)
        labels = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
        rows = load_runs(args.runs, labels)
        for path in (args.markdown, args.csv):
            if path and os.path.isdir(path):
                raise ReportError(f"{path} is a directory; pass a file path.")
        if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
            raise ReportError(f"--plots {args.plots} is a file; pass a directory.")
        report = "\n".join([format_table(rows)] + mix_notes(rows)) + "\n"
        print(report, end="")
        if args.markdown:
            write_text(args.markdown, report)
            print(f"Wrote {args.markdown}")
        if args.csv:
            write_text(args.csv, to_csv(rows))
            print(f"Wrote {args.csv}")
        if args.plots:
            path = plot_first_layer(rows, args.plots)
            print(f"Wrote {path}" if path else "No run has feature_vulnerability_wb; no plot drawn.")
    except (ReportError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
