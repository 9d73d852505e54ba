"""The cost of one unit per mask (a hand count) and the resource-aware KL built on it."""

import keras
import numpy as np
import pytest

from anp_vs_tf import attacks, models
from anp_vs_tf.config import ConfigError, RunConfig
from anp_vs_tf.metrics.unit_costs import kl_weights, unit_costs
from anp_vs_tf.models.zoo import VGG16_CONV
from anp_vs_tf.trainers import RobustModel, get_method


def test_lenet5_caffe_unit_costs_by_hand():
    model = models.lenet5_caffe(prunable=True)
    # conv1 channel: its 5x5 kernel at 24x24 positions (2 FLOPs a MAC) + bias + ReLU,
    # its 12x12 pooled outputs (4 FLOPs each), and its 5x5 slice of all 50 conv2 kernels
    # at 8x8 positions.
    conv1 = 2 * 25 * 576 + 576 + 576 + 4 * 144 + 2 * 25 * 50 * 64
    # conv2 channel: 5x5x20 kernel at 8x8 + bias + ReLU, 4x4 pooled outputs, and its 16
    # flattened features' rows of dense1 (500 outputs).
    conv2 = 2 * 25 * 20 * 64 + 64 + 64 + 4 * 16 + 2 * 16 * 500
    flatten = 2 * 500  # one dense1 input: a row of its kernel
    dense1 = 2 * 800 + 1 + 1 + 2 * 10  # its column, bias, ReLU, and its logits row
    assert unit_costs(model, "flops") == {"conv1_bbd": conv1, "conv2_bbd": conv2,
                                          "flatten_bbd": flatten, "dense1_bbd": dense1}
    assert conv1 == 190_528 and flatten == 1_000  # the issue's ~190k and ~1k
    assert unit_costs(model, "params") == {
        "conv1_bbd": 25 + 1 + 25 * 50, "conv2_bbd": 25 * 20 + 1 + 16 * 500,
        "flatten_bbd": 500, "dense1_bbd": 800 + 1 + 10}
    # Activation memory: the floats a unit's outputs take (a flattened feature is a view).
    assert unit_costs(model, "memory") == {"conv1_bbd": 576 + 144, "conv2_bbd": 64 + 16,
                                           "flatten_bbd": 0, "dense1_bbd": 1}


def test_vgg16_unit_costs_by_hand():
    model = models.vgg16(prunable=True)
    convs, side, sides, pooled_after = [], 32, [], []
    for i, width in enumerate(VGG16_CONV):
        if width == "M":
            side //= 2
            continue
        convs.append(width)
        sides.append(side)
        pooled_after.append(i + 1 < len(VGG16_CONV) and VGG16_CONV[i + 1] == "M")
    expected = {}
    for k, (width, s, pooled) in enumerate(zip(convs, sides, pooled_after)):
        c_in = 3 if k == 0 else convs[k - 1]
        own = 2 * 9 * c_in * s * s + 2 * s * s + s * s  # conv (no bias), batch norm, ReLU
        pool = s * s if pooled else 0  # 4 FLOPs per pooled output, (s/2)^2 of them
        if k + 1 < len(convs):
            consumer = 2 * 9 * convs[k + 1] * sides[k + 1] ** 2
        else:  # conv13 -> pool5 (1x1) -> flatten -> dense1 (512 outputs)
            consumer = 2 * 512
        expected[f"conv{k + 1}_bbd"] = own + pool + consumer
    expected["dense1_bbd"] = 2 * 512 + 2 + 1 + 2 * 512  # column, BN, ReLU, dense2 row
    expected["dense2_bbd"] = 2 * 512 + 2 + 1 + 2 * 10
    assert unit_costs(model, "flops") == expected


def test_kl_weights_keep_the_total_pressure():
    model = models.lenet5_caffe(prunable=True)
    units = {"conv1_bbd": 20, "conv2_bbd": 50, "flatten_bbd": 800, "dense1_bbd": 500}
    assert kl_weights(model) == {name: 1.0 for name in units}
    for resource in ("flops", "params"):
        weights, costs = kl_weights(model, resource), unit_costs(model, resource)
        assert sum(units[n] * weights[n] for n in units) == pytest.approx(sum(units.values()))
        for name in units:  # proportional to the cost
            assert weights[name] / weights["conv1_bbd"] == pytest.approx(costs[name] / costs["conv1_bbd"])
    assert kl_weights(model, "flops")["conv1_bbd"] > 100 * kl_weights(model, "flops")["flatten_bbd"]
    with pytest.raises(ValueError, match="kl_weighting must be one of"):
        kl_weights(model, "latency")


def _model(kl_weighting):
    method = get_method("anp_vs", beta_kl=4.0, lambda_vs=1e-3, num_train_examples=60000,
                        kl_weighting=kl_weighting)
    backbone = models.lenet5_caffe(prunable=True, mask_kwargs=dict(seed=0))
    for i, layer in enumerate(l for l in backbone.layers if l.name.endswith("_bbd")):
        for v in layer.mask_variables:  # different concentrations per layer, so weights matter
            v.assign(np.full(v.shape, 0.3 + 0.4 * i, v.dtype))
    return RobustModel(backbone, method, adversary=attacks.PGD(0.3, 0.1, 1), seed=0)


def test_uniform_kl_is_the_plain_sum_and_weighted_kl_the_weighted_sum():
    uniform, flops = _model("uniform"), _model("flops")
    layer_kls = {l.name: float(l.kl_divergence()) for l in uniform.mask_layers}
    assert uniform.kl_weights is None
    # The paper's loss term, as before the option existed: the plain sum, to the bit.
    assert float(uniform.kl_divergence()) == float(np.float32(sum(np.float32(v) for v in layer_kls.values())))
    weights = kl_weights(flops.backbone, "flops")
    assert flops.kl_weights == weights
    expected = sum(weights[n] * v for n, v in layer_kls.items())
    assert float(flops.kl_divergence()) == pytest.approx(expected, rel=1e-5)
    assert float(flops.kl_divergence()) != pytest.approx(float(uniform.kl_divergence()), rel=1e-2)


def test_kl_weighting_is_saved_and_checked(tmp_path):
    model = _model("params")
    model.compile(keras.optimizers.Adam(1e-3))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.method.kl_weighting == "params" and loaded.kl_weights == model.kl_weights
    with pytest.raises(ValueError, match="kl_weighting must be one of"):
        get_method("anp", num_train_examples=10, kl_weighting="latency")
    with pytest.raises(ConfigError, match="unknown kl_weighting"):
        RunConfig(kl_weighting="latency").resolved()
