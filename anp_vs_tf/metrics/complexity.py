"""Model complexity as deployed: parameters, FLOPs and activation memory, pruned units removed.

`complexity(model)` walks the functional Keras graph (`models.graph`: from the model's
outputs back through each tensor's history, so branches and `Add` work) and decides for every unit
of the last axis (a neuron, or a channel of a channel-last map) whether it is

    alive:  can be non-zero. Conv2D / Dense / BatchNormalization / Normalization
            outputs are alive everywhere (bias, BN(0) != 0); a BetaBernoulliDropout
            keeps `input alive AND active_mask`; Add is the OR of its inputs; the
            other layers keep their input's aliveness (an Activation, or a Rescaling
            with an offset, that maps 0 to non-zero makes everything alive).
    needed: reaches the logits. Conv2D / Dense need all their inputs iff any output
            is needed; a BetaBernoulliDropout needs `output needed AND active_mask`;
            Add hands its output's needs to every input; the other layers pass needs
            back unchanged (Flatten: a channel is needed if any of its positions is;
            SelectFeatures: only the selected features, as needed as their outputs).

A unit is *effective* (deployed) iff alive AND needed; all costs count effective units
only. "Needed" starts from the `logits` entry when the model outputs a dict that has
one (the `latents` are analysis outputs), otherwise from all outputs.

Conventions, per example (batch 1); Cin/Cout/in/out are effective unit counts and
H, W the output's spatial size:

    Conv2D      FLOPs 2*Kh*Kw*Cin*Cout*H*W (+ Cout*H*W bias) (+ Cout*H*W non-linear
                fused activation); params Kh*Kw*Cin*Cout (+ Cout). groups=1 only.
    Dense       FLOPs 2*in*out (+ out bias) (+ out activation); params in*out (+ out);
                times the positions if applied to a feature map.
    BatchNormalization  2 FLOPs per element (folded scale + shift); params: every
                per-channel weight (gamma, beta, moving mean, moving variance) per
                effective channel.
    Normalization, Rescaling  2 FLOPs per element; Normalization's params are its
                weights' sizes (none when built from a given mean and variance).
    ReLU, Activation  1 FLOP per element (0 for a linear Activation).
    MaxPooling2D, AveragePooling2D  Kh*Kw FLOPs per output element.
    GlobalAverage/MaxPooling2D  H*W FLOPs per channel (input size).
    Add         1 FLOP per output element per extra input.
    Flatten, Dropout, InputLayer, SelectFeatures  nothing.
    BetaBernoulliDropout  nothing: its parameters are training-only and its
                inference mask folds into the previous layer's weights.
    GaussianConv2D, GaussianDense  as Conv2D / Dense for one weight draw, plus 3 FLOPs
                per weight to draw it (mu + softplus(rho) * eps); params twice as many
                (a mean and a scale per weight). The "dense" reference counts them as
                the deterministic layers they replace, so a Bayesian network's memory
                is about 200% of the plain one (FLOPs are per weight draw).

Activation memory: output elements of every layer but Flatten, Dropout, SelectFeatures
and BetaBernoulliDropout (views or folded away), the input included; a count of floats.
"Dense" totals are the same architecture with every Beta-Bernoulli unit kept.
"""

import dataclasses
import math

import keras
import numpy as np

from anp_vs_tf.layers.bayesian import GaussianConv2D
from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout
from anp_vs_tf.layers.select_features import SelectFeatures
from anp_vs_tf.models.graph import (
    GAUSSIAN,
    LINEAR,
    is_linear_like,
    needed_outputs,
    nodes_in_order,
)

L = keras.layers

# Layers acting per unit of the last axis: "needed" passes back as is, and aliveness
# passes forward when the layer maps 0 to 0 (see `_keeps_zero`).
_CHANNELWISE = (
    L.ReLU,
    L.Activation,
    L.MaxPooling2D,
    L.AveragePooling2D,
    L.GlobalAveragePooling2D,
    L.GlobalMaxPooling2D,
    L.Dropout,
    L.Rescaling,
    L.BatchNormalization,
    L.Normalization,
)
_SUPPORTED = (L.InputLayer, L.Flatten, L.Add, BetaBernoulliDropout, SelectFeatures) + LINEAR + GAUSSIAN + _CHANNELWISE
# Outputs that are views or fold away at deployment: no activation memory of their own.
_NO_MEMORY = (L.Flatten, L.Dropout, BetaBernoulliDropout, SelectFeatures)


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
    """Per-layer rows (graph order) and totals; see the module docstring for conventions."""

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


# -- the graph -------------------------------------------------------------------------


def _check_supported(node, used):
    layer = node.layer
    if isinstance(layer, keras.Model):
        raise ValueError(
            f"{layer.name} ({type(layer).__name__}) is a nested model; complexity() needs a flat "
            "functional model (rebuild it without sub-models)."
        )
    if not isinstance(layer, _SUPPORTED):
        names = ", ".join(sorted({cls.__name__ for cls in _SUPPORTED}))
        raise ValueError(
            f"{layer.name} ({type(layer).__name__}) is not supported by complexity(); "
            f"supported layers: {names}."
        )
    if id(layer) in used:
        raise ValueError(f"{layer.name} is called more than once (shared layer); not supported.")
    used.add(id(layer))
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"{layer.name}: only channels_last data is supported.")
    if isinstance(layer, L.Conv2D) and layer.groups != 1:
        raise ValueError(f"{layer.name}: grouped convolutions (groups={layer.groups}) are not supported.")
    last_axis = (-1, len(node.output.shape) - 1)
    if isinstance(layer, L.BatchNormalization) and layer.axis not in last_axis:
        raise ValueError(f"{layer.name}: BatchNormalization must normalize the last axis.")
    for tensor in node.inputs + node.outputs:
        if any(d is None for d in tensor.shape[1:]):
            raise ValueError(f"{layer.name}: shapes must be fully known, got {tuple(tensor.shape)}.")


def _keeps_zero(layer):
    """Whether the layer maps a dead (all-zero) unit to zero, so it stays dead."""
    if isinstance(layer, (L.BatchNormalization, L.Normalization)):
        return False
    if isinstance(layer, L.Rescaling):
        return bool(np.all(np.asarray(layer.offset) == 0))
    if isinstance(layer, (L.ReLU, L.Activation)):
        return float(keras.ops.convert_to_numpy(layer.call(keras.ops.zeros((1, 1))))[0, 0]) == 0.0
    return True


@dataclasses.dataclass
class _Graph:
    nodes: list
    needed_outputs: list
    masks: dict  # id(BetaBernoulliDropout) -> bool array of its active units
    keeps_zero: dict  # id(layer) -> bool


def _graph(model):
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise ValueError(f"{model.name} has no symbolic outputs; complexity needs a functional model.")
    needed = needed_outputs(model)
    nodes = nodes_in_order(list(outputs))
    used = set()
    for node in nodes:
        _check_supported(node, used)
    layers = [node.layer for node in nodes]
    masks = {
        id(layer): np.asarray(keras.ops.convert_to_numpy(layer.active_mask()), bool)
        for layer in layers if isinstance(layer, BetaBernoulliDropout)
    }
    keeps_zero = {id(layer): _keeps_zero(layer) for layer in layers}
    return _Graph(nodes, needed, masks, keeps_zero)


# -- pruning propagation ---------------------------------------------------------------


def _units(tensor):
    return int(tensor.shape[-1])


def _forward(node, alive_in, graph, masks):
    """The output's per-unit aliveness from the inputs'."""
    layer, out = node.layer, node.output
    if isinstance(layer, L.InputLayer) or is_linear_like(layer) or not graph.keeps_zero[id(layer)]:
        return np.ones(_units(out), bool)
    if isinstance(layer, BetaBernoulliDropout):
        return alive_in[0] & masks[id(layer)]
    if isinstance(layer, L.Add):
        return np.logical_or.reduce(alive_in)
    if isinstance(layer, L.Flatten):  # (..., C) -> (positions * C,), channel-last order
        return np.tile(alive_in[0], _units(out) // len(alive_in[0]))
    if isinstance(layer, SelectFeatures):
        return alive_in[0][layer.indices]
    return alive_in[0]


def _backward(node, needed_out, masks):
    """Each input's per-unit "needed" from the output's."""
    layer, inputs = node.layer, node.inputs
    if is_linear_like(layer):
        return [np.full(_units(inputs[0]), needed_out.any())]
    if isinstance(layer, BetaBernoulliDropout):
        return [needed_out & masks[id(layer)]]
    if isinstance(layer, L.Flatten):
        return [needed_out.reshape(-1, _units(inputs[0])).any(axis=0)]
    if isinstance(layer, SelectFeatures):
        needed_in = np.zeros(_units(inputs[0]), bool)
        np.logical_or.at(needed_in, layer.indices, needed_out)
        return [needed_in]
    return [needed_out] * len(inputs)


def _effective_units(graph, masks):
    """id(tensor) -> bool array over its last axis: alive AND needed."""
    alive, needed = {}, {}
    for node in graph.nodes:
        alive_in = [alive[id(t)] for t in node.inputs]
        out = node.output
        alive[id(out)] = _forward(node, alive_in, graph, masks)
        needed[id(out)] = np.zeros(_units(out), bool)
    for tensor in graph.needed_outputs:
        needed[id(tensor)][:] = True
    for node in reversed(graph.nodes):
        needed_in = _backward(node, needed[id(node.output)], masks)
        for tensor, need in zip(node.inputs, needed_in):
            needed[id(tensor)] |= need
    return {key: alive[key] & needed[key] for key in alive}


# -- costs -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Units:
    """A tensor as deployed: `units` effective units at each of `positions` positions."""

    positions: int
    units: int

    @property
    def elements(self):
        return self.positions * self.units


def _channel_params(layer, channels, kept):
    """Per-channel weights shrink with the kept channels; other weights (a count) stay."""
    total = 0
    for weight in layer.weights:
        shape = tuple(weight.shape)
        size = math.prod(shape)
        total += size // channels * kept if shape and shape[-1] == channels else size
    return total


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _cost(layer, ins, out, channels, reference=False):
    """(params, FLOPs) of one layer; `channels` is the dense size of the output's last axis.

    `reference`: cost of the plain network the ratios compare with, where a Gaussian
    layer counts as the deterministic layer it replaces.
    """
    if is_linear_like(layer):
        convolution = isinstance(layer, (L.Conv2D, GaussianConv2D))
        taps = math.prod(_pair(layer.kernel_size)) if convolution else 1
        weights = taps * ins[0].units * out.units
        per_unit_ops = int(layer.use_bias) + int(layer.activation is not keras.activations.linear)
        flops = (2 * weights + per_unit_ops * out.units) * out.positions
        params = weights + int(layer.use_bias) * out.units
        if isinstance(layer, GAUSSIAN) and not reference:  # a mean and a scale per weight, and the draw
            return 2 * params, flops + 3 * params
        return params, flops
    if isinstance(layer, (L.BatchNormalization, L.Normalization)):
        return _channel_params(layer, channels, out.units), 2 * out.elements
    if isinstance(layer, L.Rescaling):
        return 0, 2 * out.elements
    if isinstance(layer, L.Activation) and layer.activation is keras.activations.linear:
        return 0, 0
    if isinstance(layer, (L.ReLU, L.Activation)):
        return 0, out.elements
    if isinstance(layer, (L.MaxPooling2D, L.AveragePooling2D)):
        return 0, math.prod(layer.pool_size) * out.elements
    if isinstance(layer, (L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)):
        return 0, ins[0].positions * out.units
    if isinstance(layer, L.Add):
        return 0, (len(ins) - 1) * out.elements
    return 0, 0  # InputLayer, Flatten, Dropout, BetaBernoulliDropout, SelectFeatures


def _layer_costs(graph, effective, reference=False):
    """Per node: (params, FLOPs, activations, units in, units out) for one pruning state."""
    def deployed(tensor):
        return _Units(math.prod(tensor.shape[1:-1]), int(effective[id(tensor)].sum()))

    costs = []
    for node in graph.nodes:
        layer, out_tensor = node.layer, node.output
        ins, out = [deployed(t) for t in node.inputs], deployed(out_tensor)
        params, flops = _cost(layer, ins, out, _units(out_tensor), reference)
        activations = 0 if isinstance(layer, _NO_MEMORY) else out.elements
        if node.inputs:
            units_in = int(np.logical_or.reduce([effective[id(t)] for t in node.inputs]).sum())
        else:
            units_in = out.units
        costs.append((params, flops, activations, units_in, out.units))
    return costs


def complexity(model):
    """Params, FLOPs and activation memory of `model` as deployed, dense and pruned.

    Pure Python over the graph: reads each BetaBernoulliDropout's active mask once and
    runs no forward pass, so it is cheap enough to call after every epoch.
    """
    graph = _graph(model)
    all_kept = {key: np.ones_like(mask) for key, mask in graph.masks.items()}
    dense = _layer_costs(graph, _effective_units(graph, all_kept), reference=True)
    kept = _layer_costs(graph, _effective_units(graph, graph.masks))
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
        n_active={layer.name: int(graph.masks[id(layer)].sum()) for layer in bb_layers},
        n_units={layer.name: int(layer.units) for layer in bb_layers},
    )
