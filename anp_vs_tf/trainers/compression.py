"""Pruning you can watch, and pruning to a budget: targets, then freeze and fine-tune.

`PruningMonitor` (every method with masks) adds to each epoch's logs, and so to the
progress bar, History, TensorBoard and history.csv, the units each mask layer keeps
(`kept_<layer>`), the FLOPs speed-up and the memory of the network as it would be
deployed now.

With `Method(target_flops_speedup=X, target_memory_pct=P)` (either or both; a `Target`
each), `CompressionSchedule` runs one `fit` in two phases:

    epochs 1 .. F    the masks learn, with the paper's beta KL / N plus, per target,
                     (m - 1) beta KL_cost / N, KL_cost the KL with each unit weighted by
                     what it costs (`unit_costs`: FLOPs for the speed-up, params plus
                     activations for the memory): the gradient of a cost penalty, so m
                     is a Lagrange multiplier on the target and its pressure goes where
                     the cost is (a uniform pressure strong enough to reach 4x fewer
                     FLOPs empties the cheap dense layers first and kills the network).
                     Every 1/UPDATES_PER_EPOCH of an epoch, log m += RATE * shortfall
                     (log X / s, or log memory / P; clipped to [0, log MAX_MULTIPLIER]),
                     measured with the units of E[pi] < DECIDED_KEEP counted as pruned
                     (they are on their way out; waiting for them to cross the 1e-3
                     threshold overshoots). m rises while a target is not met and falls
                     back towards the paper's beta once it is.
    end of epoch F   freeze (`freeze_to_target`): the active units are kept, and if they
                     do not yet meet every target, the units of lowest E[pi] per unit of
                     cost go too, as few as meet it; every mask is then fixed (kept
                     units E[pi], the rest exactly 0) and its parameters no longer train.
    epochs F+1 .. E  the weights fine-tune adversarially on the pruned network.

F = round((1 - finetune_fraction) * E), at least 1.
"""

import dataclasses
import math

import keras
import numpy as np

from anp_vs_tf.metrics.complexity import complexity, complexity_with
from anp_vs_tf.metrics.effective_units import effective_units, pruning_graph
from anp_vs_tf.metrics.unit_costs import unit_costs

UPDATES_PER_EPOCH = 10
RATE = 0.1  # at s = 1 and X = 4: m x1.15 per update, x4 per epoch
MAX_MULTIPLIER = 10.0
DECIDED_KEEP = 0.5


@dataclasses.dataclass(frozen=True)
class Target:
    """A budget on one resource of the deployed network.

    kind: "flops" (value: at least this many times fewer FLOPs, `Complexity.flops_speedup`)
        or "memory" (value: at most this percentage of the dense network's params plus
        activations, `Complexity.memory_pct`).
    """

    kind: str
    value: float

    # The unit costs (`metrics.unit_costs`) that weight a target's KL and rank its units.
    RESOURCE = {"flops": "flops", "memory": "footprint"}

    def __post_init__(self):
        if self.kind not in self.RESOURCE:
            raise ValueError(f"a target is on one of {tuple(self.RESOURCE)}, got {self.kind!r}.")

    @property
    def resource(self):
        return self.RESOURCE[self.kind]

    @property
    def multiplier_name(self):
        """The name of its multiplier in `RobustModel.method_state` and in the logs."""
        return f"kl_multiplier_{self.kind}"

    def shortfall(self, report):
        """log of how far `report` (a `Complexity`) is from the target: > 0 while it is not met."""
        if self.kind == "flops":
            achieved = report.flops_speedup
            return math.log(self.value / achieved) if achieved < math.inf else -math.inf
        achieved = report.memory_pct
        return math.log(achieved / self.value) if achieved > 0 else -math.inf

    def met(self, report):
        return self.shortfall(report) <= 0


def short_name(layer_name):
    """`conv1_bbd` -> `conv1`: the zoo's mask layers are named after the layer they mask."""
    return layer_name[: -len("_bbd")] if layer_name.endswith("_bbd") else layer_name


def pruning_logs(model):
    """{"kept_<layer>": active units, ..., "flops_speedup": x, "memory_pct": %} of a
    RobustModel as deployed now."""
    report = complexity(model.backbone)
    logs = {f"kept_{short_name(name)}": count for name, count in report.n_active.items()}
    logs["flops_speedup"] = report.flops_speedup
    logs["memory_pct"] = report.memory_pct
    return logs


def _keep_probabilities(graph):
    return {id(node.layer): np.asarray(node.layer.keep_probability(), np.float64)
            for node in graph.nodes if id(node.layer) in graph.masks}


def anticipated_complexity(model, decided_keep=DECIDED_KEEP):
    """The `Complexity` if the units with E[pi] < decided_keep were pruned now."""
    graph = pruning_graph(model.backbone)
    keep = _keep_probabilities(graph)
    masks = {key: graph.masks[key] & (keep[key] >= decided_keep) for key in graph.masks}
    return complexity_with(graph, masks)


def _fewest_to_meet(graph, masks, keep, target, costs):
    """`masks` with as few units dropped as meet `target`, in order of E[pi] per unit of
    cost (`costs`: {id(mask layer): the cost of one unit}); each layer keeps its best unit.
    Dropping units only lowers every cost, so the fewest is found by bisection."""
    best = {key: int(np.argmax(np.where(mask, keep[key], -np.inf))) for key, mask in masks.items()}
    candidates = sorted(
        (keep[key][unit] / max(costs[key], 1e-12), key, unit)
        for key, mask in masks.items()
        for unit in np.flatnonzero(mask)
        if unit != best[key]
    )

    def without(count):
        trial = {key: mask.copy() for key, mask in masks.items()}
        for _, key, unit in candidates[:count]:
            trial[key][unit] = False
        return trial

    def meets(count):
        return target.met(complexity_with(graph, without(count)))

    low, high = 0, len(candidates)
    if not meets(high):
        low = high
    while low < high:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle + 1
    return without(low)


def units_to_reach(graph, targets, costs):
    """Active masks ({id: bool array}) that meet every target (`Target`s) by dropping as
    few active units as needed, target by target, in order of E[pi] per unit of that
    target's cost (`costs`: {resource: {id(mask layer): the cost of one unit}}): the units
    least kept for what they cost go first. Ranking by E[pi] alone would empty the cheap
    dense layers (a flattened feature costs 1/190 of a conv1 channel's FLOPs) long
    before the FLOPs move. Dropping units for one target only helps the others.

    Returns (masks, their `Complexity`); a target is missed only if no choice meets it.
    """
    keep = _keep_probabilities(graph)
    masks = graph.masks
    for target in targets:
        masks = _fewest_to_meet(graph, masks, keep, target, costs[target.resource])
    return masks, complexity_with(graph, masks)


def freeze_to_target(model, targets=()):
    """Freeze every mask layer of `model`, pruning more (lowest E[pi] per unit of cost
    first) if needed to meet `targets`. Units that are active but not deployed (dead, or
    never reaching the logits: the flattened features of a pruned channel) are frozen
    at 0 too. Returns the `Complexity` of the frozen network."""
    graph = pruning_graph(model.backbone)
    costs = {}
    for target in targets:
        by_name = unit_costs(model.backbone, target.resource)
        costs[target.resource] = {id(node.layer): by_name[node.layer.name]
                                  for node in graph.nodes if id(node.layer) in graph.masks}
    masks, _ = units_to_reach(graph, targets, costs)
    effective = effective_units(graph, masks)
    for node in graph.nodes:
        if id(node.layer) in masks:
            node.layer.freeze(masks[id(node.layer)] & effective[id(node.output)])
    return complexity(model.backbone)


class PruningMonitor(keras.callbacks.Callback):
    """Puts each mask layer's kept units and the FLOPs speed-up into every epoch's logs."""

    def __init__(self, model):
        super().__init__()
        self.robust_model = model

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(pruning_logs(self.robust_model))


class CompressionSchedule(keras.callbacks.Callback):
    """Drives each target's KL multiplier towards it, then freezes (see the module doc)."""

    def __init__(self, method, model):
        super().__init__()
        self.method = method
        self.robust_model = model
        self._every = 1

    def multiplier(self, target):
        return self.robust_model.method_state[target.multiplier_name]

    def freeze_epoch(self):
        total = getattr(self.robust_model, "planned_epochs", None) or self.params.get("epochs", 1)
        return max(1, int(round((1.0 - self.method.finetune_fraction) * total)))

    def on_train_begin(self, logs=None):
        steps = (self.params or {}).get("steps") or UPDATES_PER_EPOCH
        self._every = max(1, int(steps) // UPDATES_PER_EPOCH)

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self._every or self.robust_model.masks_frozen():
            return
        report = anticipated_complexity(self.robust_model)
        for target in self.method.targets:
            multiplier = self.multiplier(target)
            log_m = math.log(float(multiplier.numpy()))
            shortfall = target.shortfall(report)
            log_m += RATE * shortfall if shortfall > -math.inf else -log_m
            multiplier.assign(math.exp(min(max(log_m, 0.0), math.log(MAX_MULTIPLIER))))

    def on_epoch_end(self, epoch, logs=None):
        model = self.robust_model
        if not model.masks_frozen() and epoch + 1 >= self.freeze_epoch():
            freeze_to_target(model, self.method.targets)
            model.make_train_function()  # retrace: the frozen step no longer trains masks
        if logs is not None:
            for target in self.method.targets:
                logs[target.multiplier_name] = float(self.multiplier(target).numpy())
