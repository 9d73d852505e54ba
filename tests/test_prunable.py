"""make_prunable and the residual networks: channel groups, costs, compact export, training.

The group counts and costs are written out by hand from the architectures' definitions
(He et al. 2016 for ResNet-20 and pre-activation ResNet-18, Sandler et al. 2018 and
keras.applications' `_make_divisible` for MobileNetV2), independently of the walk.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, data, models
from anp_vs_tf.export import compact
from anp_vs_tf.layers import BetaBernoulliDropout, beta_bernoulli_layers, sampling
from anp_vs_tf.metrics import complexity
from anp_vs_tf.models import graph
from anp_vs_tf.models.backbone import latent_names
from anp_vs_tf.models.folding import folded_logits
from anp_vs_tf.models.prunable import prunable_groups
from anp_vs_tf.trainers import RobustModel, get_method

L = keras.layers


def mobilenet_v2():
    """The smallest keras.applications network with residual Adds, without weights."""
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                          classifier_activation=None)


def cifar_images(data_dir, n=64):
    images, labels, _ = data.load_arrays("cifar10", "test", data_dir=data_dir, download=False)
    keep = data.class_balanced_subset(labels, n, 10)
    return images[keep].astype("float32") / 255.0, labels[keep].astype("int32")


def calibrate_and_prune(backbone, x, rng, prune=0.5, gamma=(0.5, 1.5)):
    """Moving statistics from `x` (perturbed) and random gamma/beta for every batch norm, in
    graph order, then a fraction `prune` of every mask's units switched off and varied
    E_q[pi] on the rest: an untrained network whose logits depend on its input.

    An untrained MobileNetV2 is chaotic (input noise of 1e-6 moves its logits by ~2e-3
    at gamma ~ U(0.5, 1.5)); a smaller gamma keeps float rounding near float rounding."""
    for layer in beta_bernoulli_layers(backbone):
        a_uc, b_uc = rng.uniform(1.0, 4.0, layer.units), rng.uniform(-1.0, 0.5, layer.units)
        off = rng.choice(layer.units, int(prune * layer.units), replace=False)
        a_uc[off], b_uc[off] = -10.0, 1.0
        layer.a_uc.assign(a_uc.astype("float32"))
        layer.b_uc.assign(b_uc.astype("float32"))
    values = {}
    for node in graph.nodes_in_order([graph.logits_output(backbone)]):
        if isinstance(node.layer, L.InputLayer):
            values[id(node.output)] = tf.constant(x)
            continue
        inputs = [values[id(t)] for t in node.inputs]
        if isinstance(node.layer, L.BatchNormalization):
            mean, var = (v.numpy() for v in tf.nn.moments(inputs[0], axes=[0, 1, 2][: inputs[0].shape.rank - 1]))
            n = len(mean)
            node.layer.set_weights([rng.uniform(*gamma, n), rng.normal(0, 0.2, n),
                                    mean + rng.normal(0, 0.1, n) * np.sqrt(var), var * rng.uniform(0.7, 1.4, n)])
        values[id(node.output)] = node.layer(inputs[0] if len(inputs) == 1 else inputs, training=False)


def group_summary(model, groups):
    found = prunable_groups(model, groups)
    return len(found), sum(g.channels for g in found)


# -- channel groups against hand counts -------------------------------------------------


def test_resnet20_groups_are_the_blocks_and_the_stages():
    plain = keras.Model(*_io(models.resnet20()))
    # 9 blocks with an inner channel group each (16, 32, 64 per stage), and with "all" the
    # three stages' residual groups (the stem's channels join stage 1's).
    assert group_summary(plain, "inner") == (9, 3 * (16 + 32 + 64))
    assert group_summary(plain, "all") == (12, 3 * (16 + 32 + 64) + 16 + 32 + 64)
    backbone = models.resnet20(prunable=True)
    names = [layer.name for layer in beta_bernoulli_layers(backbone)]
    assert len(names) == 12 and names[0] == "stem_bbd"
    # Stage 1's mask serves every reader of its channels: the stem's output (read by the
    # first block), blocks 1-2's outputs, and block 3's (read by stage 2's conv1 and shortcut).
    assert len(graph.calls(backbone.get_layer("stem_bbd"))) == 4
    assert len(graph.calls(backbone.get_layer("s2b1_conv2_bbd"))) == 3  # stage 2: blocks 1, 2, 3
    assert len(graph.calls(backbone.get_layer("s3b1_conv2_bbd"))) == 3  # 2 blocks + the pooled features
    assert [layer.name for layer in beta_bernoulli_layers(models.resnet20(prunable=True, groups="inner"))] == [
        f"s{s}b{b}_conv1_bbd" for s in (1, 2, 3) for b in (1, 2, 3)]
    # Same layer names with and without masks, so a pruning run starts from the plain base.
    base = models.resnet20()
    assert {layer.name for layer in base.layers} <= {layer.name for layer in backbone.layers}
    # The plain net's latents are the tensors the masks multiply: 10 of the residual
    # channels (the stem's, 8 block outputs, the pooled features), 9 inside the blocks.
    assert len(latent_names(base)) == len(latent_names(backbone)) == 19
    assert latent_names(base)[:2] == ["stem_relu", "s1b1_relu1"]
    assert latent_names(backbone)[:4] == ["stem_bbd", "s1b1_conv1_bbd", "stem_bbd_2", "s1b2_conv1_bbd"]


def test_preact_resnet18_groups():
    backbone = models.preact_resnet18(prunable=True)
    widths = (64, 128, 256, 512)
    assert complexity(backbone).n_units == {
        **{f"s{s}b{b}_conv1_bbd": w for s, w in enumerate(widths, 1) for b in (1, 2)},
        "stem_bbd": 64, "s2b1_conv2_bbd": 128, "s3b1_conv2_bbd": 256, "s4b1_conv2_bbd": 512}
    # 11.17M weights: the stem, 16 3x3 convs, 3 1x1 shortcuts, 17 BNs (4 weights per
    # channel: gamma, beta and the moving statistics), the classifier.
    convs = 3 * 3 * 3 * 64 + sum(
        9 * cin * w + 9 * w * w + 9 * w * w * 2 + (cin * w if cin != w else 0)
        for cin, w in zip((64, 64, 128, 256), widths))
    blocks = [(64, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    bns = 4 * (sum(cin + w for cin, w in blocks) + 512)  # pre and mid BN of each block, the final one
    assert complexity(backbone).params_dense == convs + bns + 512 * 10 + 10


def test_mobilenet_v2_groups_by_hand():
    """alpha 0.35: the first conv 16 channels, block 0's output 8, the stage outputs 8, 16,
    24, 32, 56, 112 (make_divisible(c * 0.35, 8)), each block's expansion 6x its input,
    the last conv 1280. The Adds tie blocks 1-2, 3-5, 6-9, 10-12 and 13-15."""
    model = mobilenet_v2()
    expansions = [6 * c for c in (8, 8, 8, 16, 16, 16, 24, 24, 24, 24, 32, 32, 32, 56, 56, 56)]
    streams = [8, 8, 16, 24, 32, 56, 112]  # block 0, 1-2, 3-5, 6-9, 10-12, 13-15, 16
    assert group_summary(model, "all") == (1 + 16 + 7 + 1, 16 + sum(expansions) + sum(streams) + 1280)
    assert group_summary(model, "inner") == (1 + 16 + 2 + 1, 16 + sum(expansions) + 8 + 112 + 1280)
    backbone = models.make_prunable(model)
    add_masks = {}
    for layer in backbone.layers:  # every Add's inputs and output are read through one mask
        if isinstance(layer, L.Add):
            readers = {c.layer.name for c in graph.consumers(graph.only_node(layer))
                       if isinstance(c.layer, BetaBernoulliDropout)}
            add_masks[layer.name] = readers
    assert len(add_masks) == 10 and all(len(readers) == 1 for readers in add_masks.values())
    assert len({next(iter(r)) for r in add_masks.values()}) == 5


# -- costs against hand counts ----------------------------------------------------------


def tiny_residual(concat=False):
    """8x8x3 -> conv a (3x3 same, 4, bias) -> ReLU -> [conv b (3x3 same, 4, no bias) -> BN]
    + a -> ReLU -> depthwise 3x3 (bias) -> [concat with a] -> GAP -> Dense 2."""
    x = keras.Input((8, 8, 3), name="image")
    a = L.ReLU(name="relu_a")(L.Conv2D(4, 3, padding="same", name="a")(x))
    b = L.BatchNormalization(name="bn_b")(L.Conv2D(4, 3, padding="same", use_bias=False, name="b")(a))
    h = L.ReLU(name="relu")(L.Add(name="add")([a, b]))
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(L.ZeroPadding2D(1, name="pad")(h))
    if concat:
        h = L.Concatenate(name="cat")([h, L.Conv2D(3, 1, name="c")(L.ZeroPadding2D(1, name="pad_c")(a))])
    logits = L.Dense(2, name="logits")(L.GlobalAveragePooling2D(name="gap")(h))
    return keras.Model(x, logits)


def test_complexity_of_a_residual_model_equals_a_hand_count():
    backbone = models.make_prunable(tiny_residual(), mask_kwargs=dict(seed=0))
    assert [layer.name for layer in beta_bernoulli_layers(backbone)] == ["a_bbd"]  # a, b, add, dw: one group
    c = complexity(backbone)

    def cost(k):  # k of the 4 channels kept
        conv_a = 2 * 9 * 3 * k * 64 + k * 64
        conv_b = 2 * 9 * k * k * 64
        flops = conv_a + k * 64 + conv_b + 2 * k * 64 + k * 64 + k * 64  # + relu_a, bn, add, relu
        flops += 2 * 9 * k * 100 + k * 100 + k * 100 + 2 * k * 2 + 2  # dw on 10x10 (+bias), gap, logits
        params = 27 * k + k + 9 * k * k + 4 * k + 9 * k + k + 2 * k + 2
        return params, flops

    assert (c.params_dense, c.flops_dense) == cost(4)
    layer = backbone.get_layer("a_bbd")
    layer.a_uc.assign(np.array([3.0, -10.0, 3.0, -10.0], "float32"))
    layer.b_uc.assign(np.array([0.0, 1.0, 0.0, 1.0], "float32"))
    c = complexity(backbone)
    assert (c.params_kept, c.flops_kept) == cost(2)
    small = compact(backbone)
    assert complexity(small).params_dense == cost(2)[0]
    # The mask sits on the Add's input a, which a sum cannot take as a scale: one Rescaling,
    # 2 FLOPs per element, is the compact model's only extra cost.
    assert complexity(small).flops_dense == cost(2)[1] + 2 * 2 * 64
    x = tf.random.stateless_uniform((5, 8, 8, 3), seed=[0, 1])
    np.testing.assert_allclose(small(x).numpy(), backbone(x)["logits"].numpy(), atol=1e-5)


def test_concatenate_joins_the_kept_channels_of_its_inputs():
    backbone = models.make_prunable(tiny_residual(concat=True), mask_kwargs=dict(seed=0))
    assert [layer.name for layer in beta_bernoulli_layers(backbone)] == ["a_bbd", "c_bbd"]
    backbone.get_layer("c_bbd").a_uc.assign(np.array([-10.0, 3.0, 3.0], "float32"))
    backbone.get_layer("c_bbd").b_uc.assign(np.array([1.0, 0.0, 0.0], "float32"))
    c = complexity(backbone)
    assert c.n_units == {"a_bbd": 4, "c_bbd": 3} and c.n_active["c_bbd"] == 2
    # One filter of conv c fewer (1x1 over 4 channels on the padded 10x10 map, and its bias),
    # one channel fewer to pool, one input row of the 2 logits fewer.
    dense = complexity(models.make_prunable(tiny_residual(concat=True)))
    assert dense.flops_dense - c.flops_kept == (2 * 4 * 100 + 100) + 100 + 2 * 2
    small = compact(backbone)
    assert small.get_layer("cat").output.shape[-1] == 6
    x = tf.random.stateless_uniform((5, 8, 8, 3), seed=[0, 2])
    np.testing.assert_allclose(small(x).numpy(), backbone(x)["logits"].numpy(), atol=1e-5)


# -- compact equals masked on real data --------------------------------------------------


@pytest.mark.parametrize("name, groups", [("resnet20", "all"), ("resnet20", "inner"), ("mobilenet_v2", "all")])
def test_compact_residual_equals_masked_on_cifar(data_dir, name, groups):
    x, _ = cifar_images(data_dir)
    keras.utils.set_random_seed(3)
    if name == "resnet20":
        backbone = models.resnet20(prunable=True, groups=groups)
    else:
        backbone = models.make_prunable(mobilenet_v2(), groups=groups)
    calibrate_and_prune(backbone, x, np.random.default_rng(3), gamma=(0.5, 1.5) if name == "resnet20" else (0.3, 0.7))
    masked = backbone(x, training=False)["logits"].numpy()
    assert masked.std(0).mean() > 0.05  # the logits depend on the input
    small = compact(backbone)
    np.testing.assert_allclose(small(x).numpy(), masked, atol=1e-4)
    np.testing.assert_allclose(folded_logits(backbone)(tf.constant(x)).numpy(), masked, atol=1e-4)
    assert not any(isinstance(layer, BetaBernoulliDropout) for layer in small.layers)
    c, c_small = complexity(backbone), complexity(small)
    assert c.params_kept == c_small.params_dense and c.flops_speedup > 1.5
    rescaled = sum(int(np.prod(layer.output.shape[1:])) for layer in small.layers if isinstance(layer, L.Rescaling))
    assert c_small.flops_dense == c.flops_kept + 2 * rescaled  # the scales before the Adds, nothing else


# -- training, saving, loading ------------------------------------------------------------


def test_a_group_mask_draws_one_sample_for_all_its_readers():
    backbone = models.resnet20(prunable=True, mask_kwargs=dict(a_init=0.5, seed=0))
    layer = backbone.get_layer("s2b1_conv2_bbd")
    calls = graph.calls(layer)
    probe = keras.Model(backbone.inputs, [call.output for call in calls])
    inputs = keras.Model(backbone.inputs, [call.inputs[0] for call in calls])
    x = tf.random.stateless_uniform((4, 32, 32, 3), seed=[0, 3])
    with sampling(seed=tf.constant([5, 6])):
        outs = probe(x, training=True)
        ins = inputs(x, training=True)
    # The mask of each reader: out / in per (example, channel) where the input is non-zero.
    masks = []
    for out, inp in zip(outs, ins):
        ratio = tf.reduce_sum(out, axis=list(range(1, out.shape.rank - 1))) / (
            tf.reduce_sum(inp, axis=list(range(1, inp.shape.rank - 1))) + 1e-30)
        masks.append(ratio.numpy())
    for mask in masks[1:]:
        np.testing.assert_allclose(mask, masks[0], rtol=1e-4, atol=1e-6)
    assert 0.05 < (masks[0] > 0.5).mean() < 0.95  # a real draw, not all on or all off


@pytest.mark.parametrize("name", ["resnet20", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_prunable_model_trains_an_anp_vs_step_saves_and_loads(data_dir, name, tmp_path):
    x, y = cifar_images(data_dir, 16)
    keras.utils.set_random_seed(0)
    base = models.resnet20() if name == "resnet20" else mobilenet_v2()
    backbone = (models.resnet20(prunable=True, mask_kwargs=dict(a_init=2.0, seed=0)) if name == "resnet20"
                else models.make_prunable(base, mask_kwargs=dict(a_init=2.0, seed=0)))
    models.transfer_weights(base, backbone)
    model = RobustModel(backbone, get_method("anp_vs", num_train_examples=100),
                        adversary=attacks.PGD(8 / 255, 2 / 255, 1), seed=0)
    model.compile(keras.optimizers.Adam(1e-3), mask_optimizer=keras.optimizers.Adam(1e-2))
    before = [layer.a_uc.numpy().copy() for layer in model.mask_layers]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][-1]) and history["vulnerability"][-1] > 0
    assert all(np.abs(layer.a_uc.numpy() - b).max() > 0 for layer, b in zip(model.mask_layers, before))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.inference_logits(x).numpy(), model.inference_logits(x).numpy())
    shared = max(model.mask_layers, key=lambda layer: len(graph.calls(layer)))
    assert len(graph.calls(loaded.backbone.get_layer(shared.name))) == len(graph.calls(shared)) > 1  # still shared


# -- clear errors --------------------------------------------------------------------------


def test_unsupported_layer_is_named_in_one_line():
    x = keras.Input((8, 8, 3))
    h = L.LayerNormalization(name="ln")(L.Conv2D(4, 3, name="conv")(x))
    model = keras.Model(x, L.Dense(2)(L.Flatten()(h)))
    with pytest.raises(ValueError, match=r"^ln \(LayerNormalization\) is not supported by make_prunable") as error:
        models.make_prunable(model)
    assert "\n" not in str(error.value)


def test_probabilities_masks_and_bad_groups_are_refused():
    with pytest.raises(ValueError, match="classifier_activation=None"):
        models.make_prunable(keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                                            classes=10))
    with pytest.raises(ValueError, match="already has Beta-Bernoulli masks"):
        models.make_prunable(keras.Model(*_io(models.lenet5_caffe(prunable=True))))
    with pytest.raises(ValueError, match="groups must be one of"):
        models.make_prunable(tiny_residual(), groups="outer")


def _io(backbone):
    return backbone.inputs, backbone.output["logits"]


def test_the_readme_example_runs_and_says_what_it_prints(capsys):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Masks in your own model"):readme.index("## Command line")]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    scope = {}
    exec(code, scope)  # noqa: S102 (the README's own example)
    printed = capsys.readouterr().out.strip()
    claimed = re.search(r"print\(complexity\(backbone\)\.n_units\)  # (\{.*?\})", code).group(1)
    assert printed == claimed
    assert isinstance(scope["model"], RobustModel)
    assert len(graph.calls(scope["backbone"].get_layer("conv1_bbd"))) == 2  # what conv2 and the sum read; the pooled features
