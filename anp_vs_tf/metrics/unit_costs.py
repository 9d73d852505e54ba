"""What one unit of each mask costs the deployed network: the weights of a resource-aware KL.

A conv1 channel of LeNet-5-Caffe carries ~190k FLOPs (its own kernel, ReLU and pooling,
and every conv2 kernel slice that reads it), a flattened feature ~1k (its dense1 row);
the paper's KL prices both alike, so the cheap units are pruned first. `kl_weights`
gives each mask layer a weight proportional to the cost of one of its units, as in
resource-weighted regularizers (MorphNet, Gordon et al. 2018), normalized so that the
total pressure is unchanged: sum over units of the weights = the number of units, the
uniform KL's.

The cost of a unit is its marginal cost in the dense network: the network's params,
FLOPs, activation memory or footprint (params + activation memory, what
`Complexity.memory_pct` counts; `metrics.layer_costs`' conventions) with every unit
kept, minus the same with that one unit pruned. The units of one mask are interchangeable
(each layer prices its units alike), so one unit per mask is priced.
"""

import numpy as np

from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout
from anp_vs_tf.metrics.effective_units import effective_units, pruning_graph
from anp_vs_tf.metrics.layer_costs import layer_costs

RESOURCES = ("flops", "params", "memory", "footprint")
KL_WEIGHTINGS = ("uniform",) + RESOURCES
_COLUMNS = {"params": (0,), "flops": (1,), "memory": (2,), "footprint": (0, 2)}


def unit_costs(model, resource="flops"):
    """{mask layer name: the cost of one of its units}, in the network with every unit kept."""
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}.")
    graph = pruning_graph(model)
    columns = _COLUMNS[resource]
    kept = {key: np.ones_like(mask) for key, mask in graph.masks.items()}

    def total(masks):
        rows = layer_costs(graph, effective_units(graph, masks), reference=True)
        return sum(row[column] for row in rows for column in columns)

    dense = total(kept)
    costs = {}
    for node in graph.nodes:
        layer = node.layer
        if isinstance(layer, BetaBernoulliDropout):
            one_off = dict(kept)
            one_off[id(layer)] = np.concatenate([[False], np.ones(len(kept[id(layer)]) - 1, bool)])
            costs[layer.name] = float(dense - total(one_off))
    return costs


def kl_weights(model, weighting="uniform"):
    """{mask layer name: the weight of its units' KL}; all 1.0 for "uniform".

    Otherwise proportional to `unit_costs(model, weighting)` and scaled so that
    sum over layers of units * weight = the number of units.
    """
    if weighting not in KL_WEIGHTINGS:
        raise ValueError(f"kl_weighting must be one of {KL_WEIGHTINGS}, got {weighting!r}.")
    masks = {n.layer.name: int(n.layer.units) for n in pruning_graph(model).nodes
             if isinstance(n.layer, BetaBernoulliDropout)}
    if weighting == "uniform":
        return {name: 1.0 for name in masks}
    costs = unit_costs(model, weighting)
    mean_cost = sum(costs[name] * units for name, units in masks.items()) / sum(masks.values())
    if mean_cost <= 0:
        raise ValueError(f"the masked units of {model.name} cost no {weighting}: use kl_weighting='uniform'.")
    return {name: costs[name] / mean_cost for name in masks}
