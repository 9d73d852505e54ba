"""Pruning you can watch, and pruning to a budget: a FLOPs target, then freeze and fine-tune.

`PruningMonitor` (every method with masks) adds to each epoch's logs, and so to the
progress bar, History, TensorBoard and history.csv, the units each mask layer keeps
(`kept_<layer>`) and the FLOPs speed-up of the network as it would be deployed now.

With `Method(target_flops_speedup=X)`, `CompressionSchedule` runs one `fit` in two phases:

    epochs 1 .. F    the masks learn, with the paper's beta KL / N plus (m - 1) beta KL_flops / N,
                     KL_flops the KL with each unit weighted by its FLOPs (`unit_costs`):
                     the gradient of a FLOPs penalty, so m is a Lagrange multiplier on
                     the constraint "speed-up >= X" and its pressure goes where the
                     FLOPs are (a uniform pressure strong enough to reach X empties the
                     cheap dense layers first and kills the network). Every
                     1/UPDATES_PER_EPOCH of an epoch, log m += RATE * log(X / s) (clipped
                     to [0, log MAX_MULTIPLIER]), where s is the speed-up with the units of
                     E[pi] < DECIDED_KEEP counted as pruned (they are on their way out;
                     waiting for them to cross the 1e-3 threshold overshoots). m rises
                     while s < X and falls back towards the paper's beta once s > X.
    end of epoch F   freeze (`freeze_to_target`): the active units are kept, and if that
                     is not yet X times fewer FLOPs, the units of lowest E[pi] go too, as
                     few as reach X; every mask is then fixed (kept units E[pi], the rest
                     exactly 0) and its parameters no longer train.
    epochs F+1 .. E  the weights fine-tune adversarially on the pruned network.

F = round((1 - finetune_fraction) * E), at least 1.
"""

import math

import keras
import numpy as np

from anp_vs_tf.metrics.complexity import complexity, flops_speedup_with
from anp_vs_tf.metrics.effective_units import effective_units, pruning_graph
from anp_vs_tf.metrics.unit_costs import unit_costs

UPDATES_PER_EPOCH = 10
RATE = 0.1  # at s = 1 and X = 4: m x1.15 per update, x4 per epoch
MAX_MULTIPLIER = 10.0
DECIDED_KEEP = 0.5


def short_name(layer_name):
    """`conv1_bbd` -> `conv1`: the zoo's mask layers are named after the layer they mask."""
    return layer_name[: -len("_bbd")] if layer_name.endswith("_bbd") else layer_name


def pruning_logs(model):
    """{"kept_<layer>": active units, ..., "flops_speedup": x} of a RobustModel as deployed now."""
    report = complexity(model.backbone)
    logs = {f"kept_{short_name(name)}": count for name, count in report.n_active.items()}
    logs["flops_speedup"] = report.flops_speedup
    return logs


def _keep_probabilities(graph):
    return {id(node.layer): np.asarray(node.layer.keep_probability(), np.float64)
            for node in graph.nodes if id(node.layer) in graph.masks}


def anticipated_speedup(model, decided_keep=DECIDED_KEEP):
    """The FLOPs speed-up if the units with E[pi] < decided_keep were pruned now."""
    graph = pruning_graph(model.backbone)
    keep = _keep_probabilities(graph)
    masks = {key: graph.masks[key] & (keep[key] >= decided_keep) for key in graph.masks}
    return flops_speedup_with(graph, masks)


def units_to_reach(graph, target, costs):
    """Active masks ({id: bool array}) that reach `target`x fewer FLOPs by dropping as few
    active units as needed, in order of E[pi] per FLOP (`costs`: {id(mask layer): FLOPs of
    one unit}): the units that are least kept for what they cost go first, and each
    layer keeps its best unit. Ranking by E[pi] alone would empty the cheap dense layers
    (a flattened feature costs 1/190 of a conv1 channel) long before the FLOPs move.

    The speed-up only grows as units go, so the fewest is found by bisection.
    Returns (masks, speed-up); the speed-up is below target only if no choice reaches it.
    """
    keep = _keep_probabilities(graph)
    best = {key: int(np.argmax(np.where(mask, keep[key], -np.inf))) for key, mask in graph.masks.items()}
    candidates = sorted(
        (keep[key][unit] / max(costs[key], 1e-12), key, unit)
        for key, mask in graph.masks.items()
        for unit in np.flatnonzero(mask)
        if unit != best[key]
    )

    def without(count):
        masks = {key: mask.copy() for key, mask in graph.masks.items()}
        for _, key, unit in candidates[:count]:
            masks[key][unit] = False
        return masks

    low, high = 0, len(candidates)
    if flops_speedup_with(graph, without(high)) < target:
        low = high
    while low < high:
        middle = (low + high) // 2
        if flops_speedup_with(graph, without(middle)) >= target:
            high = middle
        else:
            low = middle + 1
    masks = without(low)
    return masks, flops_speedup_with(graph, masks)


def freeze_to_target(model, target=None):
    """Freeze every mask layer of `model`, pruning more (lowest E[pi] first) if needed to
    reach `target`x fewer FLOPs. Units that are active but not deployed (dead, or never
    reaching the logits: the flattened features of a pruned channel) are frozen at 0 too.
    Returns the speed-up of the frozen network."""
    graph = pruning_graph(model.backbone)
    if target:
        costs = unit_costs(model.backbone, "flops")
        by_id = {id(node.layer): costs[node.layer.name] for node in graph.nodes if id(node.layer) in graph.masks}
        masks, speedup = units_to_reach(graph, target, by_id)
    else:
        masks, speedup = graph.masks, flops_speedup_with(graph, graph.masks)
    effective = effective_units(graph, masks)
    for node in graph.nodes:
        if id(node.layer) in masks:
            node.layer.freeze(masks[id(node.layer)] & effective[id(node.output)])
    return speedup


class PruningMonitor(keras.callbacks.Callback):
    """Puts each mask layer's kept units and the FLOPs speed-up into every epoch's logs."""

    def __init__(self, model):
        super().__init__()
        self.robust_model = model

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(pruning_logs(self.robust_model))


class CompressionSchedule(keras.callbacks.Callback):
    """Drives the KL multiplier towards the FLOPs target, then freezes (see the module doc)."""

    def __init__(self, method, model):
        super().__init__()
        self.method = method
        self.robust_model = model
        self._every = 1

    @property
    def multiplier(self):
        return self.robust_model.method_state["kl_multiplier"]

    def freeze_epoch(self):
        total = getattr(self.robust_model, "planned_epochs", None) or self.params.get("epochs", 1)
        return max(1, int(round((1.0 - self.method.finetune_fraction) * total)))

    def on_train_begin(self, logs=None):
        steps = (self.params or {}).get("steps") or UPDATES_PER_EPOCH
        self._every = max(1, int(steps) // UPDATES_PER_EPOCH)

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self._every or self.robust_model.masks_frozen():
            return
        speedup = anticipated_speedup(self.robust_model)
        log_m = math.log(float(self.multiplier.numpy()))
        log_m += RATE * math.log(self.method.target_flops_speedup / speedup) if speedup < math.inf else -log_m
        self.multiplier.assign(math.exp(min(max(log_m, 0.0), math.log(MAX_MULTIPLIER))))

    def on_epoch_end(self, epoch, logs=None):
        model = self.robust_model
        if not model.masks_frozen() and epoch + 1 >= self.freeze_epoch():
            freeze_to_target(model, self.method.target_flops_speedup)
            model.make_train_function()  # retrace: the frozen step no longer trains masks
        if logs is not None:
            logs["kl_multiplier"] = float(self.multiplier.numpy())
