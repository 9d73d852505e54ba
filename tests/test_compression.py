"""Pruning to a FLOPs or memory target (trainers.compression): frozen masks, the multipliers, the run.

Independent checks: a frozen unit's output is exactly zero, in training and at
inference, and its mask parameters stay bit for bit as they were through fine-tuning;
the freeze's choice of units is checked against a brute-force search over how many of
the lowest-E[pi] units to drop; a short real MNIST run with a target ends at or beyond
it (measured by `complexity`, not by the schedule's own count), a memory target too; the paper's uniform KL
loss is the same number as the formula beta * KL / N written out.
"""

import csv
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, models
from anp_vs_tf.layers import BetaBernoulliDropout
from anp_vs_tf.metrics import complexity
from anp_vs_tf.metrics.complexity import flops_speedup_with
from anp_vs_tf.metrics.effective_units import pruning_graph
from anp_vs_tf.trainers import RobustModel, get_method
from anp_vs_tf.trainers import compression
from anp_vs_tf.trainers.compression import Target
from anp_vs_tf.trainers.methods import Views

FLOPS_3 = [Target("flops", 3.0)]


def _model(method="anp_vs", target=None, a_init=10.0, **kwargs):
    """target: the FLOPs speed-up; a memory target goes in kwargs (target_memory_pct)."""
    keras.utils.set_random_seed(0)
    backbone = models.lenet5_caffe(prunable=True, mask_kwargs=dict(a_init=a_init, seed=0))
    method = get_method(method, num_train_examples=2000, beta_kl=15.0, target_flops_speedup=target, **kwargs)
    model = RobustModel(backbone, method, adversary=attacks.PGD(0.3, 0.15, 2), seed=0)
    model.compile(keras.optimizers.Adam(1e-3), mask_optimizer=keras.optimizers.Adam(1e-2))
    return model


def _spread_masks(model, seed=0):
    """Give every unit its own E[pi], spread over (1e-4, 1), so rankings are well defined."""
    rng = np.random.default_rng(seed)
    for layer in model.mask_layers:
        layer.a_uc.assign(rng.uniform(-9.0, 3.0, layer.units).astype("float32"))


def test_a_frozen_layer_multiplies_by_its_fixed_mask_in_training_and_inference():
    layer = BetaBernoulliDropout(a_init=1.0, seed=0)
    x = tf.random.stateless_uniform((16, 6), seed=[1, 2]) + 0.5
    layer(x)
    keep = np.array([True, False, True, False, False, True])
    probability = layer.keep_probability().numpy()
    layer.freeze(keep)
    expected = x.numpy() * np.where(keep, probability, 0.0)
    for training in (False, True):
        out = layer(x, training=training).numpy()
        np.testing.assert_array_equal(out[:, ~keep], 0.0)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert layer.active_mask().numpy().tolist() == keep.tolist()
    assert int(layer.num_active()) == 3
    with pytest.raises(ValueError, match="one entry per unit"):
        layer.freeze([True, False])


def test_hard_pruned_units_stay_zero_through_fine_tuning_and_their_masks_no_longer_train(mnist_subset):
    x, y, x_test, _ = mnist_subset
    x, y = x[:512], y[:512]
    model = _model("anp_vs", a_init=2.0)
    _spread_masks(model)
    compression.freeze_to_target(model, FLOPS_3)
    frozen = {l.name: (l.a_uc.numpy().copy(), l.b_uc.numpy().copy(), l.frozen_mask.numpy().copy())
              for l in model.mask_layers}
    kernels_before = [k.numpy().copy() for k in model.kernel_variables]
    mask_steps = int(model.mask_optimizer.iterations)
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    for layer in model.mask_layers:
        a, b, mask = frozen[layer.name]
        np.testing.assert_array_equal(layer.a_uc.numpy(), a)
        np.testing.assert_array_equal(layer.b_uc.numpy(), b)
        np.testing.assert_array_equal(layer.frozen_mask.numpy(), mask)
    assert int(model.mask_optimizer.iterations) == mask_steps  # the mask optimizer never ran
    assert any(not np.array_equal(k.numpy(), k0) for k, k0 in zip(model.kernel_variables, kernels_before))
    # The pruned units' outputs are exactly zero, in training mode (sampled masks
    # before freezing) and at inference.
    probe = keras.Model(model.backbone.inputs,
                        [model.backbone.get_layer(l.name).output for l in model.mask_layers])
    for training in (True, False):
        for layer, out in zip(model.mask_layers, probe(x_test[:64], training=training)):
            pruned = frozen[layer.name][2] == 0
            assert pruned.any()
            np.testing.assert_array_equal(out.numpy()[..., pruned], 0.0)
    assert complexity(model.backbone).flops_speedup >= 3.0


def test_the_freeze_drops_the_fewest_units_of_lowest_probability_per_flop_that_reach_the_target():
    model = _model()
    _spread_masks(model, seed=3)
    graph = pruning_graph(model.backbone)
    target = 6.0
    # Hand counts (tests/test_unit_costs.py): the FLOPs of one unit of each mask layer.
    costs = {id(model.backbone.get_layer(n)): c for n, c in
             (("conv1_bbd", 190_528), ("conv2_bbd", 80_192), ("flatten_bbd", 1_000), ("dense1_bbd", 1_622))}
    masks, report = compression.units_to_reach(graph, [Target("flops", target)], {"flops": costs})
    speedup = report.flops_speedup
    assert speedup >= target
    # Brute force over k: drop the k units of lowest E[pi] per FLOP (each layer keeps its best).
    keep = {id(l): l.keep_probability().numpy() for l in model.mask_layers}
    order = sorted((keep[key][u] / costs[key], key, u) for key, m in graph.masks.items() for u in np.flatnonzero(m)
                   if u != int(np.argmax(np.where(m, keep[key], -np.inf))))
    speedups = []
    for k in range(0, len(order) + 1, 1):
        trial = {key: m.copy() for key, m in graph.masks.items()}
        for _, key, u in order[:k]:
            trial[key][u] = False
        speedups.append(flops_speedup_with(graph, trial))
        if speedups[-1] >= target:
            break
    dropped = sum(int(graph.masks[key].sum() - masks[key].sum()) for key in masks)
    assert dropped == k and speedups[-2] < target
    assert speedup == pytest.approx(speedups[-1])


def test_a_memory_target_is_met_by_the_fewest_units_of_lowest_probability_per_unit_of_footprint():
    from anp_vs_tf.metrics.complexity import complexity_with
    from anp_vs_tf.metrics.unit_costs import unit_costs

    model = _model(target_memory_pct=15.0)
    _spread_masks(model, seed=5)
    # A unit's footprint is its params plus its activation memory (each hand-counted in
    # tests/test_unit_costs.py), what Complexity.memory_pct counts.
    footprint, params, memory = (unit_costs(model.backbone, r) for r in ("footprint", "params", "memory"))
    assert footprint == {name: params[name] + memory[name] for name in params}
    graph = pruning_graph(model.backbone)
    costs = {id(model.backbone.get_layer(name)): cost for name, cost in footprint.items()}
    target = Target("memory", 15.0)
    masks, report = compression.units_to_reach(graph, [target], {"footprint": costs})
    assert report.memory_pct <= 15.0 < complexity_with(graph, graph.masks).memory_pct
    # The fewest: keeping the last unit dropped (the highest E[pi] per footprint of those
    # dropped) misses the target.
    keep = {id(l): l.keep_probability().numpy() for l in model.mask_layers}
    dropped = [(keep[key][u] / costs[key], key, u) for key in masks
               for u in np.flatnonzero(graph.masks[key] & ~masks[key])]
    _, key, unit = max(dropped)
    one_more = {k: m.copy() for k, m in masks.items()}
    one_more[key][unit] = True
    assert complexity_with(graph, one_more).memory_pct > 15.0
    # Both targets: the memory target's pruning comes after the FLOPs target's, and both hold.
    both = [Target("flops", 6.0), target]
    compression.freeze_to_target(model, both)
    deployed = complexity(model.backbone)
    assert all(t.met(deployed) for t in both)


def test_the_memory_multiplier_rises_while_the_memory_is_above_its_target():
    model = _model(target=None, target_memory_pct=10.0)
    assert [t.multiplier_name for t in model.method.targets] == ["kl_multiplier_memory"]
    schedule = compression.CompressionSchedule(model.method, model)
    schedule.set_model(model)
    schedule.on_train_begin()
    multiplier = model.method_state["kl_multiplier_memory"]
    schedule.on_train_batch_end(0)  # nothing pruned: 100% of the memory
    assert float(multiplier) == pytest.approx(math.exp(compression.RATE * math.log(100.0 / 10.0)), rel=1e-6)


def test_the_multiplier_rises_below_the_target_and_falls_back_above_it():
    model = _model(target=4.0)
    schedule = compression.CompressionSchedule(model.method, model)
    schedule.set_model(model)
    schedule.on_train_begin()  # no params: one update per batch
    multiplier = model.method_state["kl_multiplier_flops"]
    assert float(multiplier) == 1.0
    schedule.on_train_batch_end(0)  # nothing pruned: s = 1
    assert float(multiplier) == pytest.approx(math.exp(compression.RATE * math.log(4.0)), rel=1e-6)
    for layer in model.mask_layers:  # E[pi] < DECIDED_KEEP everywhere but one unit per layer
        layer.a_uc.assign(np.full(layer.units, -8.0, "float32"))
        layer.a_uc[0].assign(5.0)
    before = float(multiplier)
    schedule.on_train_batch_end(1)
    assert compression.anticipated_complexity(model).flops_speedup > 4.0
    assert float(multiplier) < before
    for _ in range(50):
        schedule.on_train_batch_end(2)
    assert float(multiplier) == 1.0  # never below the paper's beta


def test_uniform_kl_loss_is_the_formula_written_out_and_the_multiplier_scales_it():
    model = _model(target=None)
    x = tf.random.stateless_uniform((8, 28, 28, 1), seed=[0, 1])
    y = tf.constant([0, 1, 2, 3, 4, 5, 6, 7])
    views = Views(*model.logits_and_latents(x, training=False))
    method = model.method
    terms = method.losses(model, views, y)
    kl = model.kl_divergence()
    ce = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, views.logits, from_logits=True))
    expected = ce + (method.weight_decay * model.kernel_l2() + method.beta_kl * kl / float(method.num_train_examples))
    assert float(terms["loss"]) == float(expected)  # the same float32 number as before targets existed
    targeted = _model(target=4.0)
    targeted.method_state["kl_multiplier_flops"].assign(7.0)
    t_terms = targeted.method.losses(targeted, views, y)
    wd = targeted.method.weight_decay * targeted.kernel_l2()
    # The multiplier's extra pressure (m - 1) goes through the FLOPs-weighted KL.
    weights = targeted.target_kl_weights["flops"]
    kl_flops = sum(weights[l.name] * float(l.kl_divergence()) for l in targeted.mask_layers)
    expected = method.beta_kl / 2000.0 * (float(targeted.kl_divergence()) + 6.0 * kl_flops)
    assert float(t_terms["loss"] - ce - wd) == pytest.approx(expected, rel=1e-5)
    assert weights["conv1_bbd"] > 100 * weights["flatten_bbd"]


def test_a_target_needs_masks_and_a_factor_above_one():
    with pytest.raises(ValueError, match="no masks"):
        get_method("at", target_flops_speedup=4.0)
    with pytest.raises(ValueError, match="> 1"):
        get_method("anp_vs", num_train_examples=10, target_flops_speedup=0.5)
    with pytest.raises(ValueError, match="finetune_fraction"):
        get_method("anp_vs", num_train_examples=10, finetune_fraction=1.0)
    with pytest.raises(ValueError, match="no masks"):
        get_method("at", target_memory_pct=10.0)
    with pytest.raises(ValueError, match=r"\(0, 100\)"):
        get_method("anp_vs", num_train_examples=10, target_memory_pct=0.0)


def test_a_frozen_model_saves_and_loads_frozen(tmp_path):
    model = _model(target=3.0)
    _spread_masks(model)
    compression.freeze_to_target(model, FLOPS_3)
    path = tmp_path / "frozen.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.masks_frozen()
    assert loaded.method.target_flops_speedup == 3.0
    for a, b in zip(model.mask_layers, loaded.mask_layers):
        np.testing.assert_array_equal(a.inference_mask().numpy(), b.inference_mask().numpy())
    assert complexity(loaded.backbone).flops_speedup == pytest.approx(complexity(model.backbone).flops_speedup)


def test_a_short_mnist_run_with_a_target_ends_beyond_it_and_logs_the_pruning(tmp_path, data_dir):
    from anp_vs_tf import experiment
    from anp_vs_tf.config import RunConfig

    config = RunConfig(
        method="anp_vs", dataset="mnist", data_dir=str(data_dir), out_dir=str(tmp_path / "run"),
        pretrain_epochs=1, epochs=3, train_subset=2000, test_subset=300, batch_size=100,
        pgd_steps=2, step_size=0.15, eval_pgd_steps=5, eval_batch_size=300, sanity_examples=0,
        fgsm=False, beta_kl=15.0, mask_a_init=10.0, target_flops_speedup=4.0, target_memory_pct=30.0,
        finetune_fraction=0.34,
        download=False, verbose=0,
    )
    metrics = experiment.run(config)
    assert metrics["target_flops_speedup"] == 4.0 and metrics["target_memory_pct"] == 30.0
    assert metrics["target_met"] is True
    assert metrics["flops_speedup"] >= 4.0 and metrics["memory_pct"] <= 30.0
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert model.masks_frozen()
    deployed = complexity(model.backbone)
    assert deployed.flops_speedup >= 4.0 and deployed.memory_pct <= 30.0
    assert metrics["clean_acc"] > 0.3  # 60 steps of 2,000 images: well above chance (10%), not broken
    with open(tmp_path / "run" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert {"kept_conv1", "kept_conv2", "kept_flatten", "kept_dense1", "flops_speedup", "memory_pct",
            "kl_multiplier_flops", "kl_multiplier_memory"} <= set(rows[0])
    assert float(rows[-1]["flops_speedup"]) >= 4.0  # the freeze (after epoch 2) is in epoch 2's row
    assert float(rows[1]["kept_conv1"]) == float(rows[2]["kept_conv1"])  # frozen for the last epoch
    assert (tmp_path / "run" / "plots" / "pruning.png").stat().st_size > 5000


def test_the_cli_refuses_a_target_for_a_method_without_masks_before_any_work():
    from anp_vs_tf.config import RunConfig
    from anp_vs_tf.errors import ConfigError

    with pytest.raises(ConfigError, match="has none: use bp, anp or anp_vs"):
        RunConfig(method="at", target_flops_speedup=4.0).resolved()
    with pytest.raises(ConfigError, match="> 1"):
        RunConfig(method="anp_vs", target_flops_speedup=1.0).resolved()
    with pytest.raises(ConfigError, match="target_memory_pct prunes with masks"):
        RunConfig(method="trades", target_memory_pct=10.0).resolved()
    with pytest.raises(ConfigError, match=r"in \(0, 100\)"):
        RunConfig(method="anp_vs", target_memory_pct=100.0).resolved()
