"""Params, FLOPs and activation memory of each layer, counting effective units only.

`layer_costs(graph, effective)` prices every node of a `PruningGraph` given which units
are effective (`metrics.effective_units`). Conventions, per example (batch 1);
Cin/Cout/in/out are effective unit counts and H, W the output's spatial size:

    Conv2D      FLOPs 2*Kh*Kw*Cin*Cout*H*W (+ Cout*H*W bias) (+ Cout*H*W non-linear
                fused activation); params Kh*Kw*Cin*Cout (+ Cout). groups=1 only.
    DepthwiseConv2D  FLOPs 2*Kh*Kw*C*H*W (+ C*H*W bias) (+ C*H*W activation); params
                Kh*Kw*C (+ C). depth_multiplier 1 only (C in = C out).
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
    Flatten, Dropout, InputLayer, SelectFeatures, ZeroPadding2D, Concatenate  nothing
                (a padded or joined copy: only its activation memory).
    BetaBernoulliDropout  nothing: its parameters are training-only and its
                inference mask folds into the previous layer's weights.
    GaussianConv2D, GaussianDense  as Conv2D / Dense for one weight draw, plus 3 FLOPs
                per weight to draw it (mu + softplus(rho) * eps); params twice as many
                (a mean and a scale per weight). The "dense" reference counts them as
                the deterministic layers they replace, so a Bayesian network's memory
                is about 200% of the plain one (FLOPs are per weight draw).

Activation memory: output elements of every layer but Flatten, Dropout, SelectFeatures
and BetaBernoulliDropout (views or folded away), the input included; a count of floats.
A mask called on several tensors (a tied channel group) costs nothing at any of them.
"""

import dataclasses
import math

import keras
import numpy as np

from anp_vs_tf.layers.bayesian import GaussianConv2D
from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout
from anp_vs_tf.layers.select_features import SelectFeatures
from anp_vs_tf.models.graph import GAUSSIAN, is_linear_like

L = keras.layers

# Outputs that are views or fold away at deployment: no activation memory of their own.
_NO_MEMORY = (L.Flatten, L.Dropout, BetaBernoulliDropout, SelectFeatures)


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
    if isinstance(layer, L.DepthwiseConv2D):
        weights = math.prod(_pair(layer.kernel_size)) * out.units
        per_unit_ops = int(layer.use_bias) + int(layer.activation is not keras.activations.linear)
        return weights + int(layer.use_bias) * out.units, (2 * weights + per_unit_ops * out.units) * out.positions
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
    return 0, 0  # InputLayer, Flatten, Dropout, BetaBernoulliDropout, SelectFeatures, ZeroPadding2D, Concatenate


def layer_costs(graph, effective, reference=False):
    """Per node of `graph`: (params, FLOPs, activations, units in, units out).

    `effective` is `effective_units(graph, masks)` for one pruning state; `reference`
    counts Gaussian layers as the deterministic layers they replace (see `_cost`).
    """
    def deployed(tensor):
        return _Units(math.prod(tensor.shape[1:-1]), int(effective[id(tensor)].sum()))

    costs = []
    for node in graph.nodes:
        layer, out_tensor = node.layer, node.output
        ins, out = [deployed(t) for t in node.inputs], deployed(out_tensor)
        params, flops = _cost(layer, ins, out, int(out_tensor.shape[-1]), reference)
        activations = 0 if isinstance(layer, _NO_MEMORY) else out.elements
        if isinstance(layer, L.Concatenate):
            units_in = sum(int(effective[id(t)].sum()) for t in node.inputs)
        elif node.inputs:
            units_in = int(np.logical_or.reduce([effective[id(t)] for t in node.inputs]).sum())
        else:
            units_in = out.units
        costs.append((params, flops, activations, units_in, out.units))
    return costs
