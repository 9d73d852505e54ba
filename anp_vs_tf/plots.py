"""The paper's figures, written as PNG files.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through
pyplot: they work headless and leave the caller's backend (a notebook's, say) and
pyplot's figure registry untouched. Every `plot_*` function takes plain numbers and
arrays, writes `path` (creating its folder) and returns it; `write_run_plots` draws
what one evaluated model can show by itself.
"""

import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the "3d" projection)

DPI = 100
MAX_SALIENCY_EXAMPLES = 8


def _figure(width, height):
    # Constrained layout keeps a suptitle clear of two-line panel titles.
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path, title):
    if title:
        figure.suptitle(title)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    figure.clear()  # free the artists now; the figure was never registered with pyplot
    return path


def plot_active_units(n_active, n_units, path, title=None):
    """Total vs. active units of each mask layer, each labelled with the kept percentage."""
    names = list(n_units)
    total = np.array([n_units[n] for n in names], float)
    active = np.array([n_active[n] for n in names], float)
    figure = _figure(max(4.0, 1.2 * len(names) + 2), 3.5)
    ax = figure.add_subplot()
    positions = np.arange(len(names))
    ax.bar(positions, total, width=0.6, color="lightgray", label="units")
    bars = ax.bar(positions, active, width=0.4, color="tab:blue", label="active")
    for bar, kept, units in zip(bars, active, total):
        share = 100.0 * kept / units if units else 0.0
        ax.annotate(f"{share:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, names, rotation=30 if len(names) > 4 else 0)
    ax.set_ylabel("units")
    ax.legend()
    return _save(figure, path, title)


def plot_pruning(epochs, kept, n_units, path, flops_speedup=None, title=None):
    """Kept units of each mask layer over the epochs (as a share of its units), and the
    FLOPs speed-up of the network as deployed after each epoch on a second axis.

    Args:
        epochs: the epoch numbers (1, 2, ...).
        kept: {layer: kept units after each epoch}; n_units: {layer: its units}.
        flops_speedup: the speed-up after each epoch, or None.
    """
    figure = _figure(6.0, 3.6)
    ax = figure.add_subplot()
    for name, counts in kept.items():
        share = 100.0 * np.asarray(counts, float) / n_units[name]
        ax.plot(epochs, share, marker="o", markersize=3,
                label=f"{name} ({int(counts[-1])}/{n_units[name]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("units kept (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower left")
    if flops_speedup is not None:
        right = ax.twinx()
        right.plot(epochs, flops_speedup, color="black", linestyle="--", label="FLOPs speed-up")
        right.set_ylabel("x fewer FLOPs (dashed)")
        right.set_ylim(bottom=0)
    return _save(figure, path, title)


def read_pruning_history(path):
    """(epochs, {layer: kept units}, speed-ups) from a run's history.csv, the last row of
    each epoch (a resumed run may have logged an epoch twice); None without kept_ columns."""
    import csv

    with open(path, newline="") as f:
        rows = {int(row["epoch"]): row for row in csv.DictReader(f)}
    if not rows or not any(key.startswith("kept_") for key in next(iter(rows.values()))):
        return None
    ordered = [rows[e] for e in sorted(rows)]
    layers = [key for key in ordered[0] if key.startswith("kept_")]
    kept = {key[len("kept_"):]: [float(r[key]) for r in ordered] for key in layers}
    speedup = [float(r["flops_speedup"]) for r in ordered] if "flops_speedup" in ordered[0] else None
    return [e + 1 for e in sorted(rows)], kept, speedup


def plot_vulnerability_histograms(series, path, title=None, bins=30):
    """Histograms of per-feature vulnerability, one panel per model, on a shared x range.

    Args:
        series: list of (label, 1-D array of per-feature vulnerabilities). Pruned
            features have exactly zero vulnerability; each panel reports their share.
    """
    values = [np.asarray(v, float).ravel() for _, v in series]
    top = max((v.max() for v in values if v.size), default=0.0)
    edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
    figure = _figure(3.2 * len(series) + 0.5, 3.2)
    axes = figure.subplots(1, len(series), sharex=True, squeeze=False)[0]
    for ax, (label, _), v in zip(axes, series, values):
        ax.hist(np.clip(v, edges[0], edges[-1]), bins=edges, color="tab:blue")
        zero = 100.0 * np.mean(v == 0) if v.size else 0.0
        ax.set_title(f"{label}\nzero vulnerability: {zero:.1f}%", fontsize=9)
        ax.set_xlabel("feature vulnerability")
    axes[0].set_ylabel("features")
    return _save(figure, path, title)


def plot_loss_surface(alphas, betas, losses, path, title=None):
    """The loss landscape as a 3-D surface and as a contour map (see `analysis.loss_surface`)."""
    a, b = np.meshgrid(np.asarray(alphas), np.asarray(betas), indexing="ij")
    losses = np.asarray(losses)
    figure = _figure(10, 4.2)
    surface = figure.add_subplot(1, 2, 1, projection="3d")
    surface.plot_surface(a, b, losses, cmap="viridis", linewidth=0)
    surface.set_zlabel("loss")
    contour = figure.add_subplot(1, 2, 2)
    filled = contour.contourf(a, b, losses, levels=20, cmap="viridis")
    contour.plot([0], [0], "r+", markersize=10)
    figure.colorbar(filled, ax=contour, label="loss")
    for ax in (surface, contour):
        ax.set_xlabel("adversarial direction")
        ax.set_ylabel("random direction")
    return _save(figure, path, title)


def plot_saliency(images, saliency, path, labels=None, title=None):
    """One row per example (at most 8): the image and its saliency heat map."""
    images = np.asarray(images)[:MAX_SALIENCY_EXAMPLES]
    saliency = np.asarray(saliency)[: len(images)]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    figure = _figure(4.0, 2.0 * len(images))
    axes = figure.subplots(len(images), 2, squeeze=False)
    for row, (ax_image, ax_map) in enumerate(axes):
        ax_image.imshow(np.clip(images[row], 0, 1), cmap="gray", vmin=0, vmax=1)
        ax_map.imshow(saliency[row], cmap="hot", vmin=0, vmax=1)
        if labels is not None:
            ax_image.set_ylabel(f"label {labels[row]}")
        for ax in (ax_image, ax_map):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("vulnerability saliency", fontsize=9)
    return _save(figure, path, title)


def write_run_plots(model, dataset, adversary, out_dir, metrics=None, num_saliency=8, seed=0):
    """Every figure one evaluated run can draw by itself, into `out_dir`/plots/.

    pruning.png (models with masks, from out_dir/history.csv: kept units per layer over
    the epochs), active_units.png (models with masks), feature_vulnerability.png (first latent
    layer: from metrics["feature_vulnerability_wb"] if there, else measured on the
    first batch), loss_surface.png (first example) and saliency.png (first
    `num_saliency` examples, x~ from `adversary`). Only the first batch of `dataset`
    is read. The two vulnerability figures need latent features and are skipped for
    a backbone without them.

    Returns:
        the paths written.
    """
    # The model's analyses need TensorFlow; the plot_* functions above do not.
    from anp_vs_tf import analysis
    from anp_vs_tf.models.backbone import latent_names

    plots = pathlib.Path(out_dir) / "plots"
    x, y = next(iter(dataset))
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    paths = []
    history = pathlib.Path(out_dir) / "history.csv"
    if model.mask_layers and history.exists():
        from anp_vs_tf.trainers.compression import short_name

        read = read_pruning_history(history)
        if read is not None:
            epochs, kept, speedup = read
            units = {short_name(l.name): l.units for l in model.mask_layers}
            if set(kept) <= set(units):
                paths.append(plot_pruning(epochs, kept, units, plots / "pruning.png",
                                          flops_speedup=speedup, title="pruning over the epochs"))
    if model.mask_layers:
        paths.append(plot_active_units(
            {l.name: int(l.num_active()) for l in model.mask_layers},
            {l.name: l.units for l in model.mask_layers},
            plots / "active_units.png", title="active units",
        ))
    names = latent_names(model.backbone)
    if names:
        stored = (metrics or {}).get("feature_vulnerability_wb", {})
        vulnerability = stored.get(names[0])
        if vulnerability is None:
            vulnerability = analysis.first_layer_feature_vulnerability(model, [(x, y)], adversary, seed)
        paths.append(plot_vulnerability_histograms(
            [(f"{model.method.name}: {names[0]}", vulnerability)],
            plots / "feature_vulnerability.png",
        ))
    surface = analysis.loss_surface(model, x[0], y[0], adversary=adversary, seed=seed)
    paths.append(plot_loss_surface(
        surface["alphas"], surface["betas"], surface["losses"], plots / "loss_surface.png",
        title=f"loss around test example 0 (label {y[0]})",
    ))
    if names:
        x_few, y_few = x[:num_saliency], y[:num_saliency]
        x_adv = analysis.attack_batch(model, x_few, y_few, adversary, seed)
        paths.append(plot_saliency(
            x_few, analysis.vulnerability_saliency(model, x_few, x_adv), plots / "saliency.png",
            labels=list(y_few),
        ))
    return paths
