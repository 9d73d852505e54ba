"""Model complexity as deployed: parameters, FLOPs and activation memory, pruned units removed.

`complexity(model)` reads the functional Keras graph and its mask layers
(`metrics.effective_units`: which units are alive and reach the logits), prices every
layer with only those units (`metrics.layer_costs`, where the FLOP and memory
conventions are written out) and returns a `Complexity`: per-layer rows and totals,
"dense" (the same architecture with every Beta-Bernoulli unit kept) and "kept" (as
pruned), with the ratios the paper reports.
"""

import dataclasses
import math

import numpy as np

from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout
from anp_vs_tf.metrics.effective_units import effective_units, pruning_graph
from anp_vs_tf.metrics.layer_costs import layer_costs


@dataclasses.dataclass(frozen=True)
class LayerComplexity:
    """One layer's cost, dense (all units kept) and as pruned; units are (dense, kept)."""

    name: str
    class_name: str
    params_dense: int
    params_kept: int
    flops_dense: int
    flops_kept: int
    activations_dense: int
    activations_kept: int
    units_in: tuple
    units_out: tuple


@dataclasses.dataclass(frozen=True)
class Complexity:
    """Per-layer rows (graph order) and totals; the conventions are in `metrics.layer_costs`."""

    layers: tuple
    params_dense: int
    params_kept: int
    flops_dense: int
    flops_kept: int
    activations_dense: int
    activations_kept: int
    n_active: dict
    n_units: dict

    def layer(self, name):
        """The row of layer `name`."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer named {name!r} in this complexity report.")

    @property
    def flops_speedup(self):
        return self.flops_dense / self.flops_kept if self.flops_kept else math.inf

    @property
    def params_kept_pct(self):
        return 100.0 * self.params_kept / self.params_dense

    @property
    def memory_pct(self):
        kept = self.params_kept + self.activations_kept
        return 100.0 * kept / (self.params_dense + self.activations_dense)

    @property
    def sparsity_pct(self):
        total = sum(self.n_units.values())
        return 100.0 * (1.0 - sum(self.n_active.values()) / total) if total else 0.0

    def to_dict(self):
        """Totals and ratios as plain Python numbers (json-serializable)."""
        out = {
            key: int(getattr(self, key))
            for key in (
                "params_dense", "params_kept", "flops_dense", "flops_kept",
                "activations_dense", "activations_kept",
            )
        }
        for key in ("flops_speedup", "params_kept_pct", "memory_pct", "sparsity_pct"):
            out[key] = float(getattr(self, key))
        out["n_active"] = {k: int(v) for k, v in self.n_active.items()}
        out["n_units"] = {k: int(v) for k, v in self.n_units.items()}
        return out

    def format_table(self):
        """A per-layer table (kept/dense in every cell) with totals and ratios."""
        header = ("layer", "class", "units in", "units out", "params", "FLOPs", "activations")

        def pair(kept, dense):
            return f"{kept:,}/{dense:,}"

        rows = [
            (
                r.name, r.class_name, pair(r.units_in[1], r.units_in[0]),
                pair(r.units_out[1], r.units_out[0]), pair(r.params_kept, r.params_dense),
                pair(r.flops_kept, r.flops_dense), pair(r.activations_kept, r.activations_dense),
            )
            for r in self.layers
        ]
        rows.append((
            "total", "", "", "", pair(self.params_kept, self.params_dense),
            pair(self.flops_kept, self.flops_dense),
            pair(self.activations_kept, self.activations_dense),
        ))
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

        def line(row):
            left = [cell.ljust(w) for cell, w in zip(row[:2], widths)]
            right = [cell.rjust(w) for cell, w in zip(row[2:], widths[2:])]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(line(header))
        return "\n".join(
            ["(kept/dense)", line(header), rule]
            + [line(r) for r in rows[:-1]]
            + [rule, line(rows[-1]),
               f"FLOPs speedup {self.flops_speedup:.2f}x, params kept {self.params_kept_pct:.2f}%, "
               f"memory {self.memory_pct:.2f}%, sparsity {self.sparsity_pct:.2f}%"]
        )


def complexity(model):
    """Params, FLOPs and activation memory of `model` as deployed, dense and pruned.

    Pure Python over the graph: reads each BetaBernoulliDropout's active mask once and
    runs no forward pass, so it is cheap enough to call after every epoch.
    """
    graph = pruning_graph(model)
    return complexity_with(graph, graph.masks)


def complexity_with(graph, masks):
    """The `Complexity` of the network of `graph` (`pruning_graph(model)`) with the active
    masks `masks` ({id(mask layer): bool array}) instead of its own: what a pruning
    decision would buy, before it is made."""
    all_kept = {key: np.ones_like(mask) for key, mask in graph.masks.items()}
    dense = layer_costs(graph, effective_units(graph, all_kept), reference=True)
    kept = layer_costs(graph, effective_units(graph, masks))
    rows = tuple(
        LayerComplexity(
            name=node.layer.name,
            class_name=type(node.layer).__name__,
            params_dense=d[0], params_kept=k[0],
            flops_dense=d[1], flops_kept=k[1],
            activations_dense=d[2], activations_kept=k[2],
            units_in=(d[3], k[3]), units_out=(d[4], k[4]),
        )
        for node, d, k in zip(graph.nodes, dense, kept)
    )
    bb_layers = [n.layer for n in graph.nodes if isinstance(n.layer, BetaBernoulliDropout)]
    return Complexity(
        layers=rows,
        **{
            f"{what}_{state}": sum(getattr(r, f"{what}_{state}") for r in rows)
            for what in ("params", "flops", "activations")
            for state in ("dense", "kept")
        },
        n_active={layer.name: int(masks[id(layer)].sum()) for layer in bb_layers},
        n_units={layer.name: int(layer.units) for layer in bb_layers},
    )


def flops_speedup_with(graph, masks):
    """Dense FLOPs / FLOPs of the network of `graph` with the active masks `masks`."""
    return complexity_with(graph, masks).flops_speedup
