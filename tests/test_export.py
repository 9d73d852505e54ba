"""compact() removes pruned units exactly; export() writes a SavedModel TF Serving can load alone."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from anp_vs_tf import attacks, data, models
from anp_vs_tf.export import compact, export, export_file
from anp_vs_tf.layers import BetaBernoulliDropout, SelectFeatures, beta_bernoulli_layers
from anp_vs_tf.metrics import complexity
from anp_vs_tf.trainers import RobustModel, get_method

PLAIN_LAYERS = (
    keras.layers.InputLayer, keras.layers.Normalization, keras.layers.Conv2D, keras.layers.Dense,
    keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.MaxPooling2D, keras.layers.Flatten,
    SelectFeatures,
)
MASK_OPS = {"Softplus", "GreaterEqual"}  # computing E_q[pi] and thresholding it
PY_FUNC_OPS = {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


def set_masks(layer, keep, rng):
    """Prune every unit of `layer` but `keep`; the kept ones get varied mask values E_q[pi]."""
    pruned = np.setdiff1d(np.arange(layer.units), keep)
    a_uc, b_uc = rng.uniform(1.0, 4.0, layer.units), rng.uniform(-1.0, 0.5, layer.units)  # E_q[pi] 0.57-0.91
    a_uc[pruned], b_uc[pruned] = -10.0, 1.0  # E_q[pi] ~ a^b: below the threshold needs b >~ 1
    layer.a_uc.assign(a_uc.astype("float32"))
    layer.b_uc.assign(b_uc.astype("float32"))


def prune_fraction(model, keep_fraction, rng):
    for layer in beta_bernoulli_layers(model):
        keep = int(round(keep_fraction[layer.name] * layer.units))
        set_masks(layer, rng.choice(layer.units, keep, replace=False), rng)


def graph_ops(fn, spec):
    return {op.type for op in tf.function(fn).get_concrete_function(spec).graph.get_operations()}


def check_compact(masked, small, x):
    """Same logits, only plain layers, widths = active units, costs = complexity's kept costs."""
    diff = np.abs(masked.inference_logits(x).numpy() - small.predict(x, verbose=0, batch_size=250))
    assert diff.max() <= 1e-4
    assert masked.inference_logits(x).numpy().std(0).mean() > 0.1  # the logits depend on the input
    assert all(type(layer) in PLAIN_LAYERS for layer in small.layers)
    active = {layer.name[: -len("_bbd")]: int(layer.num_active()) for layer in masked.mask_layers}
    for name, units in active.items():
        new = small.get_layer(name)
        if isinstance(new, keras.layers.Flatten):  # its mask's pruned features are checked by the caller
            continue
        assert (new.filters if isinstance(new, keras.layers.Conv2D) else new.units) == units
    dense, kept = complexity(masked.backbone), complexity(small)
    assert (kept.params_dense, kept.flops_dense) == (dense.params_kept, dense.flops_kept)
    assert dense.flops_kept < dense.flops_dense
    spec = tf.TensorSpec((None,) + x.shape[1:], tf.float32)
    assert MASK_OPS <= graph_ops(masked.inference_logits, spec)  # the check below means something
    assert not MASK_OPS & graph_ops(small, spec)


def calibrate_batch_norm(backbone, x, rng):
    """Moving statistics near the real ones on `x` (perturbed), random gamma and beta, layer by
    layer: with made-up statistics an untrained VGG's logits would not depend on its input."""
    h = tf.constant(x)
    for layer in backbone.layers[1:]:  # VGG is a chain
        if isinstance(layer, keras.layers.BatchNormalization):
            mean, var = (v.numpy() for v in tf.nn.moments(h, axes=list(range(h.shape.rank - 1))))
            n = len(mean)
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n),
                               mean + rng.normal(0, 0.1, n) * np.sqrt(var), var * rng.uniform(0.7, 1.4, n)])
        h = layer(h, training=False)


@pytest.fixture(scope="module")
def pruned_lenet(trained_lenet, mnist_subset):
    """ANP-VS LeNet-5-Caffe from the trained base, a few steps, then units pruned in every layer."""
    x, y, _, _ = mnist_subset
    keras.utils.set_random_seed(1)
    backbone = models.lenet5_caffe(prunable=True)
    models.transfer_weights(trained_lenet.backbone, backbone)
    method = get_method("anp_vs", beta_kl=4.0, lambda_vs=1e-3, num_train_examples=len(x))
    model = RobustModel(backbone, method, adversary=attacks.PGD(0.3, 0.1, 2), seed=1)
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(x[:1280], y[:1280], batch_size=128, epochs=1, verbose=0)
    prune_fraction(backbone, {"conv1_bbd": 0.7, "conv2_bbd": 0.6, "flatten_bbd": 0.5, "dense1_bbd": 0.4},
                   np.random.default_rng(0))
    return model


def test_compact_lenet_equals_masked_model(pruned_lenet, mnist_subset):
    x_test = mnist_subset[2]
    small = compact(pruned_lenet)
    check_compact(pruned_lenet, small, x_test)
    assert [layer.name for layer in small.layers] == [
        "image", "conv1", "pool1", "conv2", "pool2", "flatten", "flatten_kept", "dense1", "logits"
    ]
    # dense1 reads the flattened features (index = position * 50 + channel) that both
    # conv2's mask and the mask on the flattened map keep.
    backbone = pruned_lenet.backbone
    channels = backbone.get_layer("conv2_bbd").active_mask().numpy()
    features = backbone.get_layer("flatten_bbd").active_mask().numpy()
    rows = int(np.sum(features & np.tile(channels, 4 * 4)))
    assert 0 < rows < 4 * 4 * 30
    assert small.get_layer("dense1").kernel.shape == (rows, 200)
    again = compact(small)  # a compact model is its own compact form
    assert [layer.get_config() for layer in again.layers[1:]] == [layer.get_config() for layer in small.layers[1:]]
    np.testing.assert_allclose(again.predict(x_test, verbose=0), small.predict(x_test, verbose=0), atol=1e-5)
    accuracy = np.mean(np.argmax(small.predict(x_test, verbose=0), -1) == mnist_subset[3])
    assert accuracy > 0.5  # a real network, not a constant


def test_compact_vgg16_with_batch_norm(data_dir):
    images, labels, _ = data.load_arrays("cifar10", "test", data_dir=data_dir, download=False)
    x = images[data.class_balanced_subset(labels, 200, 10)].astype("float32") / 255.0
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    backbone = models.vgg16(prunable=True)
    keep = {layer.name: 1.0 for layer in beta_bernoulli_layers(backbone)}
    keep.update(conv2_bbd=0.625, conv5_bbd=0.4, conv9_bbd=0.4, conv13_bbd=0.6, dense1_bbd=0.5)
    prune_fraction(backbone, keep, rng)
    calibrate_batch_norm(backbone, x, rng)
    model = RobustModel(backbone, get_method("anp", num_train_examples=50000),
                        adversary=attacks.PGD(0.03, 0.007, 1), seed=2)
    small = compact(model)
    check_compact(model, small, x)
    assert small.get_layer("bn5").moving_mean.shape == (102,)
    assert isinstance(small.layers[1], keras.layers.Normalization)


def saved_graph_ops(path):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for graph in proto.meta_graphs:
        ops |= {node.op for node in graph.graph_def.node}
        for function in graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    return ops


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    out = serve(images=tf.constant(np.load(sys.argv[2])))
    np.save(sys.argv[3], out["logits"].numpy())
    print(sorted(m for m in sys.modules if m.startswith("anp_vs_tf")))
""")


def test_export_serves_without_the_package(pruned_lenet, mnist_subset, tmp_path, capsys):
    x = mnist_subset[2][:64]
    report = export(pruned_lenet, str(tmp_path / "export"), 1)
    version = tmp_path / "export" / "1"
    assert sorted(os.listdir(tmp_path / "export")) == ["1"]  # no staging folder left behind
    for name in ("saved_model.pb", "variables", "compact.keras", "export.json"):
        assert (version / name).exists()
    with open(version / "export.json") as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(report))
    assert written["widths"]["dense1"] == {"before": 500, "after": 200}
    assert written["widths"]["conv2"] == {"before": 50, "after": 30}
    c = complexity(pruned_lenet.backbone)
    assert written["params"] == {"before": c.params_dense, "after": c.params_kept}
    assert written["flops"]["after"] == c.flops_kept and written["flops"]["speedup"] > 1
    assert set(written["files"]) == {"saved_model_bytes", "keras_bytes"} and written["notes"] == []
    assert written["signature"]["inputs"]["images"] == {"dtype": "float32", "shape": [None, 28, 28, 1]}
    assert "widths changed" in capsys.readouterr().out

    expected = pruned_lenet.inference_logits(x).numpy()
    reloaded = keras.saving.load_model(version / "compact.keras")
    assert np.abs(reloaded.predict(x, verbose=0) - expected).max() <= 1e-4

    # A fresh Python that imports only tensorflow serves it.
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(version), str(tmp_path / "x.npy"), str(tmp_path / "fresh.npy")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert np.abs(np.load(tmp_path / "fresh.npy") - expected).max() <= 1e-4

    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    done = subprocess.run(
        [cli, "run", "--dir", str(version), "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"images={tmp_path / 'x.npy'}", "--outdir", str(tmp_path / "cli")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    probabilities = np.load(tmp_path / "cli" / "probabilities.npy")
    assert np.abs(np.load(tmp_path / "cli" / "logits.npy") - expected).max() <= 1e-4
    assert np.abs(probabilities - tf.nn.softmax(expected).numpy()).max() <= 1e-5

    ops = saved_graph_ops(str(version))
    assert "Conv2D" in ops and not ops & PY_FUNC_OPS and not ops & MASK_OPS

    # Wrong shape or dtype: the signature says what it expects.
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected shape \[\?,28,28,1\]"):
        serve(images=tf.zeros((2, 32, 32, 3)))
    for dtype in (tf.int32, tf.uint8):
        with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
            serve(images=tf.zeros((2, 28, 28, 1), dtype))

    # An existing version is never overwritten.
    mtime = os.path.getmtime(version / "saved_model.pb")
    with pytest.raises(ValueError, match="already exists; versions are never overwritten"):
        export(pruned_lenet, str(tmp_path / "export"), 1)
    with pytest.raises(ValueError, match="already exists"):
        export_file("no/such/model.keras", str(tmp_path / "export"), 1)  # refused before loading
    assert os.path.getmtime(version / "saved_model.pb") == mtime
    assert sorted(os.listdir(tmp_path / "export")) == ["1"]


def test_model_without_masks_exports_unchanged(trained_lenet, mnist_subset, tmp_path, capsys):
    x = mnist_subset[2][:100]
    report = export(trained_lenet, str(tmp_path), 3)
    assert report["notes"] == ["lenet5_caffe has no Beta-Bernoulli layers: nothing to prune, exported unchanged."]
    assert "note: lenet5_caffe has no Beta-Bernoulli layers" in capsys.readouterr().out
    assert all(w["before"] == w["after"] for w in report["widths"].values())
    assert report["params"]["before"] == report["params"]["after"] == trained_lenet.backbone.count_params()
    serve = tf.saved_model.load(str(tmp_path / "3")).signatures["serving_default"]
    logits = serve(images=tf.constant(x))["logits"].numpy()
    assert np.abs(logits - trained_lenet.inference_logits(x).numpy()).max() <= 1e-4


def test_unsupported_graph_and_bad_versions(tmp_path):
    inputs = keras.Input((8,))
    x = keras.layers.Dense(6, activation="relu", name="hidden")(inputs)
    x = BetaBernoulliDropout(name="hidden_bbd")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    with pytest.raises(ValueError, match=r"^bn \(BatchNormalization\) sits between a mask and the next"):
        compact(model)
    with pytest.raises(ValueError, match="cannot export"):
        export(model, str(tmp_path), 1)
    for version in (0, -1, "1", 1.0):
        with pytest.raises(ValueError, match="positive integer"):
            export(model, str(tmp_path), version)
    assert os.listdir(tmp_path) == []
