"""The paper's results table, from the metrics dicts of one or more runs."""

COLUMNS = (
    ("Clean acc.", "clean_acc", lambda v: f"{100 * v:.2f}"),
    ("Adv. acc. (WB)", "pgd_acc", lambda v: f"{100 * v:.2f}"),
    ("Vul. (WB)", "vulnerability_wb", lambda v: f"{v:.3f}"),
    ("Memory", "memory_pct", lambda v: f"{v:.2f}"),
    ("xFLOPs", "flops_speedup", lambda v: f"{v:.2f}"),
    ("Sparsity", "sparsity_pct", lambda v: f"{v:.2f}"),
)


def format_table(rows):
    """A Markdown table: one row per (label, metrics) pair; missing values show as '-'."""
    header = ["Model"] + [title for title, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for label, metrics in rows:
        cells = [label] + [
            fmt(metrics[key]) if metrics.get(key) is not None else "-" for _, key, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
