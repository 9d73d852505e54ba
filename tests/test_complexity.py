"""complexity() against hand counts written out independently of the library's code.

Conventions (see anp_vs_tf/metrics/layer_costs.py): per example; a multiply-add is 2
FLOPs; bias, fused non-linear activation, ReLU: 1 per output element; BN: 2 per
element and 4 params per channel; max-pool: Kh*Kw per output element.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf.layers import BetaBernoulliDropout, SelectFeatures
from anp_vs_tf.metrics.complexity import complexity
from anp_vs_tf.models.zoo import build_model


def keep_only(layer, keep):
    """Switch off every unit of a BetaBernoulliDropout layer except the indices `keep`."""
    a_uc = np.array(layer.a_uc.numpy())
    off = np.ones(layer.units, bool)
    off[list(keep)] = False
    a_uc[off] = -10.0
    layer.a_uc.assign(a_uc)


# -- LeNet-5-Caffe ---------------------------------------------------------------------

LENET5_PARAMS = (
    5 * 5 * 1 * 20 + 20  # conv1
    + 5 * 5 * 20 * 50 + 50  # conv2
    + 800 * 500 + 500  # dense1 (4*4*50 = 800 inputs)
    + 500 * 10 + 10  # logits
)
LENET5_FLOPS = (
    2 * 5 * 5 * 1 * 20 * 24 * 24 + 20 * 24 * 24 + 20 * 24 * 24  # conv1: MACs, bias, relu
    + 2 * 2 * 12 * 12 * 20  # pool1
    + 2 * 5 * 5 * 20 * 50 * 8 * 8 + 50 * 8 * 8 + 50 * 8 * 8  # conv2
    + 2 * 2 * 4 * 4 * 50  # pool2
    + 2 * 800 * 500 + 500 + 500  # dense1
    + 2 * 500 * 10 + 10  # logits
)
LENET5_ACTIVATIONS = 28 * 28 + 24 * 24 * 20 + 12 * 12 * 20 + 8 * 8 * 50 + 4 * 4 * 50 + 500 + 10


def test_lenet5_caffe_dense():
    plain = build_model("lenet5_caffe", prunable=False)
    prunable = build_model("lenet5_caffe", prunable=True)
    assert LENET5_PARAMS == 431_080 and LENET5_FLOPS == 4_631_170
    assert LENET5_PARAMS == plain.count_params()
    # Each mask unit has a, b and its frozen-mask value, each mask layer a frozen flag:
    # training-only state, not deployed parameters.
    assert LENET5_PARAMS == prunable.count_params() - 3 * (20 + 50 + 800 + 500) - 4
    for model in (plain, prunable):
        c = complexity(model)
        assert (c.params_dense, c.params_kept) == (LENET5_PARAMS, LENET5_PARAMS)
        assert (c.flops_dense, c.flops_kept) == (LENET5_FLOPS, LENET5_FLOPS)
        assert c.activations_dense == c.activations_kept == LENET5_ACTIVATIONS
        assert c.flops_speedup == 1.0 and c.params_kept_pct == 100.0 and c.memory_pct == 100.0
        assert c.sparsity_pct == 0.0
    assert complexity(plain).n_units == {}
    assert complexity(prunable).n_units == {"conv1_bbd": 20, "conv2_bbd": 50, "flatten_bbd": 800, "dense1_bbd": 500}


# conv1 keeps 5 of 20, conv2 10 of 50, dense1 100 of 500 (scattered indices); the mask on
# the flattened map (index = position * 50 + channel) keeps the first 8 of 16 positions.
LENET5_KEEP = {"conv1_bbd": range(0, 20, 4), "conv2_bbd": range(0, 50, 5), "flatten_bbd": range(400),
               "dense1_bbd": range(0, 500, 5)}
LENET5_PRUNED_PARAMS = (
    5 * 5 * 1 * 5 + 5  # conv1
    + 5 * 5 * 5 * 10 + 10  # conv2
    + (8 * 10) * 100 + 100  # dense1: 10 channels at 8 of the 4*4 positions
    + 100 * 10 + 10  # logits
)
LENET5_PRUNED_FLOPS = (
    2 * 5 * 5 * 1 * 5 * 24 * 24 + 5 * 24 * 24 + 5 * 24 * 24
    + 2 * 2 * 12 * 12 * 5
    + 2 * 5 * 5 * 5 * 10 * 8 * 8 + 10 * 8 * 8 + 10 * 8 * 8
    + 2 * 2 * 4 * 4 * 10
    + 2 * 80 * 100 + 100 + 100
    + 2 * 100 * 10 + 10
)
LENET5_PRUNED_ACTIVATIONS = 28 * 28 + 24 * 24 * 5 + 12 * 12 * 5 + 8 * 8 * 10 + 4 * 4 * 10 + 100 + 10


def check_pruned_lenet5(c):
    assert c.params_dense == LENET5_PARAMS and c.flops_dense == LENET5_FLOPS
    assert c.params_kept == LENET5_PRUNED_PARAMS
    assert c.flops_kept == LENET5_PRUNED_FLOPS
    assert c.activations_kept == LENET5_PRUNED_ACTIVATIONS
    assert c.flops_speedup == pytest.approx(LENET5_FLOPS / LENET5_PRUNED_FLOPS)
    assert c.params_kept_pct == pytest.approx(100 * LENET5_PRUNED_PARAMS / LENET5_PARAMS)
    assert c.memory_pct == pytest.approx(
        100 * (LENET5_PRUNED_PARAMS + LENET5_PRUNED_ACTIVATIONS) / (LENET5_PARAMS + LENET5_ACTIVATIONS)
    )
    assert c.sparsity_pct == pytest.approx(100 * (1 - (5 + 10 + 400 + 100) / 1370))
    assert c.n_active == {"conv1_bbd": 5, "conv2_bbd": 10, "flatten_bbd": 400, "dense1_bbd": 100}
    assert c.layer("dense1").units_in == (800, 80)
    assert c.layer("conv2").units_in == (20, 5) and c.layer("conv2").units_out == (50, 10)
    assert c.layer("logits").units_out == (10, 10)


def test_lenet5_caffe_pruned():
    model = build_model("lenet5_caffe", prunable=True)
    for name, keep in LENET5_KEEP.items():
        keep_only(model.get_layer(name), keep)
    c = complexity(model)
    check_pruned_lenet5(c)
    summary = json.loads(json.dumps(c.to_dict()))
    assert summary["params_kept"] == LENET5_PRUNED_PARAMS
    assert summary["n_active"] == {"conv1_bbd": 5, "conv2_bbd": 10, "flatten_bbd": 400, "dense1_bbd": 100}
    for key in ("params_dense", "flops_dense", "flops_kept", "flops_speedup", "params_kept_pct",
                "memory_pct", "sparsity_pct", "n_units"):
        assert key in summary
    table = c.format_table()
    assert "dense1" in table and "80/800" in table and f"{LENET5_PRUNED_FLOPS:,}" in table


def test_model_built_under_a_distribution_strategy():
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = build_model("lenet5_caffe", prunable=True)
        for name, keep in LENET5_KEEP.items():
            keep_only(model.get_layer(name), keep)
    check_pruned_lenet5(complexity(model))


# -- LeNet-300-100 ---------------------------------------------------------------------


def test_lenet_300_100_dense_and_pruned():
    model = build_model("lenet_300_100", prunable=True)
    dense_params = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    dense_flops = (2 * 784 * 300 + 300 + 300) + (2 * 300 * 100 + 100 + 100) + (2 * 100 * 10 + 10)
    assert dense_params == build_model("lenet_300_100").count_params()

    keep_only(model.get_layer("dense1_bbd"), range(0, 300, 10))  # 30 of 300
    keep_only(model.get_layer("dense2_bbd"), range(1, 100, 5))  # 20 of 100
    c = complexity(model)
    kept_params = 784 * 30 + 30 + 30 * 20 + 20 + 20 * 10 + 10
    kept_flops = (2 * 784 * 30 + 30 + 30) + (2 * 30 * 20 + 20 + 20) + (2 * 20 * 10 + 10)
    assert (c.params_dense, c.params_kept) == (dense_params, kept_params)
    assert (c.flops_dense, c.flops_kept) == (dense_flops, kept_flops)
    assert (c.activations_dense, c.activations_kept) == (784 + 300 + 100 + 10, 784 + 30 + 20 + 10)
    assert c.n_active == {"dense1_bbd": 30, "dense2_bbd": 20}
    assert c.sparsity_pct == pytest.approx(100 * (1 - 50 / 400))
    assert c.memory_pct == pytest.approx(100 * (kept_params + 844) / (dense_params + 1194))


# -- VGG-16 ----------------------------------------------------------------------------

# (width, input height = width of the square map, max-pool after it?) for the 13 convs.
VGG16_PLAN = [
    (64, 32, False), (64, 32, True),
    (128, 16, False), (128, 16, True),
    (256, 8, False), (256, 8, False), (256, 8, True),
    (512, 4, False), (512, 4, False), (512, 4, True),
    (512, 2, False), (512, 2, False), (512, 2, True),
]


def vgg16_hand_count(conv_kept, dense_kept, num_classes=10):
    """(params, FLOPs) of VGG-16 on 32x32x3 keeping `conv_kept[i]` channels of conv i+1."""
    params, flops = 0, 2 * 32 * 32 * 3  # input standardization: (x - mean) / std
    cin = 3
    for (_, size, pooled), cout in zip(VGG16_PLAN, conv_kept):
        hw = size * size
        params += 3 * 3 * cin * cout + 4 * cout  # conv (no bias) + BN
        flops += 2 * 3 * 3 * cin * cout * hw + 2 * cout * hw + cout * hw  # conv, BN, ReLU
        if pooled:
            flops += 2 * 2 * (size // 2) ** 2 * cout
        cin = cout
    for cout in dense_kept:  # after the fifth pool the map is 1x1, so flatten keeps cin units
        params += cin * cout + 4 * cout
        flops += 2 * cin * cout + 2 * cout + cout
        cin = cout
    return params + cin * num_classes + num_classes, flops + 2 * cin * num_classes + num_classes


def test_vgg16_dense():
    model = build_model("vgg16", prunable=False)
    widths = [w for w, _, _ in VGG16_PLAN]
    params, flops = vgg16_hand_count(widths, [512, 512])
    assert (params, flops) == (15_260_874, 628_415_498)
    assert params == model.count_params()
    c = complexity(model)
    assert (c.params_dense, c.params_kept, c.flops_dense, c.flops_kept) == (params, params, flops, flops)


def test_vgg16_pruned():
    model = build_model("vgg16", prunable=True)
    ratios = [0.5, 0.25, 0.75, 0.5, 0.125, 0.5, 0.25, 0.1, 0.3, 0.05, 0.2, 0.5, 0.02, 0.1, 0.25]
    names = [f"conv{i}_bbd" for i in range(1, 14)] + ["dense1_bbd", "dense2_bbd"]
    rng = np.random.default_rng(0)
    kept = []
    for name, ratio in zip(names, ratios):
        layer = model.get_layer(name)
        k = max(1, round(ratio * layer.units))
        keep_only(layer, rng.choice(layer.units, k, replace=False))
        kept.append(k)
    c = complexity(model)
    dense = vgg16_hand_count([w for w, _, _ in VGG16_PLAN], [512, 512])
    pruned = vgg16_hand_count(kept[:13], kept[13:])
    assert (c.params_dense, c.flops_dense) == dense
    assert (c.params_kept, c.flops_kept) == pruned
    assert c.flops_speedup == pytest.approx(dense[1] / pruned[1])
    assert c.n_active == dict(zip(names, kept))
    assert c.sparsity_pct == pytest.approx(100 * (1 - sum(kept) / sum(c.n_units.values())))


# -- graphs with branches --------------------------------------------------------------


def test_residual_add_with_a_pruned_branch():
    x = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(x)
    a = keras.layers.Conv2D(8, 3, padding="same", name="branch")(h)
    a = BetaBernoulliDropout(name="branch_bbd")(a)
    s = keras.layers.Add(name="add")([h, a])
    s = keras.layers.ReLU(name="relu")(s)
    g = keras.layers.GlobalAveragePooling2D(name="gap")(s)
    logits = keras.layers.Dense(3, name="logits")(g)
    side = keras.layers.Conv2D(2, 1, name="side")(h)  # feeds only the latents: never deployed
    model = keras.Model(x, {"logits": logits, "latents": [a, side]})
    keep_only(model.get_layer("branch_bbd"), [1, 4, 6])
    c = complexity(model)

    hw = 6 * 6
    stem = (3 * 3 * 4 * 8 + 8, 2 * 3 * 3 * 4 * 8 * hw + 8 * hw + 8 * hw)
    tail = 8 * hw + 8 * hw + 8 * hw  # add (one extra input), relu, global pooling: all 8 channels
    logits_cost = (8 * 3 + 3, 2 * 8 * 3 + 3)
    branch_dense = (3 * 3 * 8 * 8 + 8, 2 * 3 * 3 * 8 * 8 * hw + 8 * hw)
    branch_kept = (3 * 3 * 8 * 3 + 3, 2 * 3 * 3 * 8 * 3 * hw + 3 * hw)
    assert c.params_dense == stem[0] + branch_dense[0] + logits_cost[0]
    assert c.params_kept == stem[0] + branch_kept[0] + logits_cost[0]
    assert c.flops_dense == stem[1] + branch_dense[1] + tail + logits_cost[1]
    assert c.flops_kept == stem[1] + branch_kept[1] + tail + logits_cost[1]
    assert c.layer("branch").units_out == (8, 3)
    assert c.layer("add").units_out == (8, 8)  # the identity path keeps every channel alive
    assert c.layer("side").flops_dense == c.layer("side").params_dense == 0
    assert c.n_active == {"branch_bbd": 3} and c.n_units == {"branch_bbd": 8}


def test_add_of_two_pruned_branches_keeps_their_union():
    x = keras.Input((5, 5, 2))
    a = BetaBernoulliDropout(name="a_bbd")(keras.layers.Conv2D(6, 1, name="a")(x))
    b = BetaBernoulliDropout(name="b_bbd")(keras.layers.Conv2D(6, 1, name="b")(x))
    s = keras.layers.Add(name="add")([a, b])
    logits = keras.layers.Dense(2, name="logits")(keras.layers.Flatten(name="flatten")(s))
    model = keras.Model(x, logits)
    keep_only(model.get_layer("a_bbd"), [0, 1, 2])
    keep_only(model.get_layer("b_bbd"), [2, 3])  # union: channels 0-3
    c = complexity(model)

    hw = 5 * 5
    params = (2 * 3 + 3) + (2 * 2 + 2) + (hw * 4 * 2 + 2)
    flops = (2 * 2 * 3 * hw + 3 * hw) + (2 * 2 * 2 * hw + 2 * hw) + 4 * hw + (2 * hw * 4 * 2 + 2)
    assert (c.params_kept, c.flops_kept) == (params, flops)
    assert c.activations_kept == 2 * hw + 3 * hw + 2 * hw + 4 * hw + 2
    assert c.layer("logits").units_in == (150, 100)


def test_flatten_maps_channels_in_channel_last_order():
    x = keras.Input((2, 2, 3))
    h = BetaBernoulliDropout(name="c_bbd")(keras.layers.Conv2D(3, 1, name="c")(x))
    h = BetaBernoulliDropout(name="f_bbd")(keras.layers.Flatten(name="flatten")(h))
    model = keras.Model(x, keras.layers.Dense(2, name="out")(h))
    keep_only(model.get_layer("c_bbd"), [0])
    # Flattened index (h*W + w)*C + c: 6 is channel 0 at position 2 (alive), 4 is channel 1.
    keep_only(model.get_layer("f_bbd"), [4, 6])
    c = complexity(model)
    assert c.layer("out").units_in == (12, 1)
    assert c.layer("c").units_out == (3, 1)


def test_select_features_needs_only_the_channels_it_selects():
    x = keras.Input((2, 2, 3))
    h = keras.layers.Flatten(name="flatten")(keras.layers.Conv2D(3, 1, name="c")(x))
    h = SelectFeatures([1, 4, 7, 10], name="select")(h)  # channel 1 at each of the 4 positions
    model = keras.Model(x, keras.layers.Dense(2, name="out")(h))
    c = complexity(model)
    # Channels 0 and 2 reach nothing: not needed, so not deployed (with or without masks).
    assert c.layer("c").units_out == (1, 1)
    assert c.layer("c").params_kept == 3 * 1 + 1 and c.layer("c").flops_kept == (2 * 3 + 1) * 4
    assert c.layer("select").activations_kept == 0 and c.layer("select").flops_kept == 0
    assert c.layer("out").units_in == (4, 4) and c.layer("out").params_kept == 4 * 2 + 2


def test_strides_dilation_and_an_activation_that_revives_pruned_units():
    x = keras.Input((9, 9, 2))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False, name="c1")(x)  # 5x5
    h = keras.layers.Conv2D(3, 3, dilation_rate=2, name="c2")(h)  # valid, span 5: 1x1
    h = keras.layers.Dense(4, name="d1")(keras.layers.Flatten()(h))
    h = BetaBernoulliDropout(name="d1_bbd")(h)
    h = keras.layers.Activation("sigmoid", name="sigmoid")(h)  # sigmoid(0) = 0.5: alive again
    model = keras.Model(x, keras.layers.Dense(1, name="out")(h))
    keep_only(model.get_layer("d1_bbd"), [0, 3])
    c = complexity(model)
    assert c.layer("c1").flops_kept == 2 * 3 * 3 * 2 * 4 * 5 * 5
    assert c.layer("c2").flops_kept == 2 * 3 * 3 * 4 * 3 * 1 + 3
    assert c.layer("d1").units_out == (4, 2)
    assert c.layer("sigmoid").flops_kept == 4
    assert c.layer("out").units_in == (4, 4)


# -- errors ----------------------------------------------------------------------------


def test_unsupported_layer_is_named():
    x = keras.Input((4, 4, 3))
    y = keras.layers.LayerNormalization(name="my_layer_norm")(x)
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(y)))
    with pytest.raises(ValueError, match="my_layer_norm.*LayerNormalization.*supported layers:.*Conv2D"):
        complexity(model)


def test_nested_model_is_rejected():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="inner")
    x = keras.Input((3,))
    model = keras.Model(x, keras.layers.Dense(1)(inner(x)))
    with pytest.raises(ValueError, match="inner.*nested model"):
        complexity(model)


def test_gaussian_layers_count_a_mean_and_a_scale_per_weight():
    """AT BNN: the deployed network stores two numbers per weight of the plain one."""
    plain = complexity(build_model("lenet5_caffe"))
    bayesian = complexity(build_model("lenet5_caffe", bayesian_kwargs={}))
    assert bayesian.params_dense == plain.params_dense  # the plain network is the reference
    assert bayesian.params_kept == 2 * plain.params_kept
    assert bayesian.flops_kept == plain.flops_kept + 3 * plain.params_kept  # + drawing the weights
    assert bayesian.memory_pct == pytest.approx(
        100 * (2 * plain.params_kept + plain.activations_kept) / (plain.params_dense + plain.activations_dense)
    )
    assert 190 < bayesian.memory_pct < 200


def test_select_features_round_trips_and_checks_its_indices():
    layer = SelectFeatures([2, 0], name="pick")
    np.testing.assert_array_equal(layer(np.array([[5.0, 6.0, 7.0]])), [[7.0, 5.0]])
    assert SelectFeatures.from_config(layer.get_config()).indices == [2, 0]
    with pytest.raises(ValueError, match="index 3 is out of range for 3 features"):
        SelectFeatures([3])(keras.Input((3,)))
    with pytest.raises(ValueError, match="non-empty"):
        SelectFeatures([])
