"""The training step: which optimizer moves what, shared masks, the losses, saving."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, models
from anp_vs_tf.layers import kumaraswamy_beta_kl
from anp_vs_tf.metrics import network_vulnerability
from anp_vs_tf.trainers import RobustModel, get_method

HPARAMS = dict(beta_kl=4.0, lambda_vs=0.5, adv_weight=2.0, weight_decay=1e-4, num_train_examples=60000)


def make_model(method="anp_vs", seed=0, fuse_views="auto", **kwargs):
    keras.utils.set_random_seed(seed)
    prunes = get_method(method, **HPARAMS).prunes
    backbone = models.lenet5_caffe(prunable=prunes, mask_kwargs=dict(a_init=1.0, seed=seed))
    return RobustModel(
        backbone, get_method(method, **HPARAMS), adversary=attacks.PGD(0.3, 0.1, 3),
        fuse_views=fuse_views, seed=seed, **kwargs,
    )


def values(variables):
    return [v.numpy().copy() for v in variables]


def changed(before, after):
    return [not np.array_equal(b, a) for b, a in zip(before, after)]


@pytest.mark.parametrize("frozen", ["weights", "masks"])
def test_each_optimizer_moves_only_its_own_variables(mnist_subset, frozen):
    x, y, _, _ = mnist_subset
    model = make_model()
    weight_lr, mask_lr = (0.0, 1e-2) if frozen == "weights" else (1e-3, 0.0)
    model.compile(keras.optimizers.SGD(weight_lr), mask_optimizer=keras.optimizers.SGD(mask_lr))
    weights, masks = values(model.weight_variables), values(model.mask_variables)
    model.train_on_batch(x[:64], y[:64])
    weights_moved = changed(weights, values(model.weight_variables))
    masks_moved = changed(masks, values(model.mask_variables))
    if frozen == "weights":
        assert not any(weights_moved) and all(masks_moved)
    else:
        assert all(weights_moved) and not any(masks_moved)
    assert len(model.mask_variables) == 2 * 4  # a and b of conv1, conv2, flatten, dense1
    assert len(model.weight_variables) == 8  # kernels and biases of conv1, conv2, dense1, logits


def test_clean_and_adversarial_views_share_one_mask_sample(mnist_subset):
    """With x~ = x the vulnerability is exactly zero only if both views use one mask."""
    x = tf.constant(mnist_subset[0][:32])
    for fuse in (True, False):
        views = make_model(fuse_views=fuse).forward_views(x, x)
        assert float(network_vulnerability(views.latents, views.latents_adv)) == 0.0
    model = make_model()
    _, independent = model.logits_and_latents(x, training=True)
    _, again = model.logits_and_latents(x, training=True)
    assert float(network_vulnerability(independent, again)) > 0.0


def test_fused_and_separate_forward_passes_agree(mnist_subset):
    """Without batch norm, one stacked [x; x~] batch is the same computation as two calls."""
    x = tf.constant(mnist_subset[0][:32])
    x_adv = tf.clip_by_value(x + 0.1, 0.0, 1.0)
    fused = make_model(fuse_views=True).forward_views(x, x_adv)
    separate = make_model(fuse_views=False).forward_views(x, x_adv)
    np.testing.assert_allclose(fused.logits_adv.numpy(), separate.logits_adv.numpy(), atol=1e-5)
    for a, b in zip(fused.latents_adv, separate.latents_adv):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_anp_vs_losses_match_a_hand_computation(mnist_subset):
    x, y = tf.constant(mnist_subset[0][:64]), tf.constant(mnist_subset[1][:64])
    model = make_model()
    x_adv = model.attack(x, y)
    views = model.forward_views(x, x_adv)
    terms = model.method.losses(model, views, y)

    def ce(logits):
        logits = logits.numpy().astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        return float(np.mean(log_z - logits[np.arange(len(logits)), y.numpy()]))

    kernels = [v.numpy() for v in model.weight_variables if v.path.endswith("kernel")]
    decay = 1e-4 * sum(float((k.astype(np.float64) ** 2).sum()) / 2 for k in kernels)
    kl = 0.0
    for layer in model.mask_layers:
        a, b = (t.numpy().astype(np.float64) for t in layer.concentrations())
        kl += float(np.sum(kumaraswamy_beta_kl(a, b, 1e-4)))
    vulnerability = np.mean([
        np.abs(z.numpy() - za.numpy()).mean() for z, za in zip(views.latents, views.latents_adv)
    ])
    ce_clean, ce_adv = ce(views.logits), ce(views.logits_adv)
    expected_loss = (ce_clean + 2 * ce_adv) / 3 + 4.0 * kl / 60000 + decay + 0.5 * vulnerability
    expected_mask_loss = ce_adv + 4.0 * kl / 60000 + decay
    assert float(terms["loss"]) == pytest.approx(expected_loss, rel=1e-4)
    assert float(terms["mask_loss"]) == pytest.approx(expected_mask_loss, rel=1e-4)
    assert float(terms["vulnerability"]) == pytest.approx(vulnerability, rel=1e-4)


def test_standard_and_at_losses(mnist_subset):
    x, y = tf.constant(mnist_subset[0][:64]), tf.constant(mnist_subset[1][:64])
    standard = make_model("standard")
    terms = standard.method.losses(standard, standard.forward_views(x), y)
    assert set(terms) == {"ce", "loss"}
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"]) + 1e-4 * float(standard.kernel_l2()), rel=1e-5)
    at = make_model("at")
    terms = at.method.losses(at, at.forward_views(x, at.attack(x, y)), y)
    assert "mask_loss" not in terms and "kl" not in terms
    expected = (float(terms["ce"]) + 2 * float(terms["ce_adv"])) / 3 + 1e-4 * float(at.kernel_l2())
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["ce_adv"]) > float(terms["ce"])  # the attack found harder inputs


def test_save_then_load_reproduces_predictions_and_training_state(mnist_subset, tmp_path):
    x, y, x_test, _ = mnist_subset
    model = make_model()
    model.compile(keras.optimizers.Adam(1e-3), mask_optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RobustModel) and loaded.method.get_config() == model.method.get_config()
    np.testing.assert_array_equal(model.predict(x_test, verbose=0), loaded.predict(x_test, verbose=0))
    for original, restored in ((model.optimizer, loaded.optimizer), (model.mask_optimizer, loaded.mask_optimizer)):
        assert int(restored.iterations) == int(original.iterations) == 4
        for a, b in zip(original.variables, restored.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Same weights, optimizer slots and random streams: the next step is identical too.
    model.train_on_batch(x[256:320], y[256:320])
    loaded.train_on_batch(x[256:320], y[256:320])
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_fit_and_evaluate_with_the_usual_keras_callbacks(mnist_subset, tmp_path):
    x, y, x_test, y_test = mnist_subset
    model = make_model("anp_vs", eval_adversary=attacks.PGD(0.3, 0.05, 5))
    model.compile(keras.optimizers.Adam(1e-3))
    history = model.fit(
        x[:512], y[:512], batch_size=128, epochs=2, verbose=0,
        validation_data=(x_test[:200], y_test[:200]),
        callbacks=[
            keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras")),
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
            keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        ],
    )
    for key in ("loss", "mask_loss", "ce", "ce_adv", "kl", "vulnerability", "acc", "acc_adv", "sparsity",
                "val_acc", "val_acc_adv", "val_vulnerability"):
        assert len(history.history[key]) == 2, key
    assert all(np.isfinite(v) for v in history.history["loss"])
    assert (tmp_path / "ckpt.keras").exists() and (tmp_path / "log.csv").exists()
    assert any(name.startswith("events") for _, _, files in os.walk(tmp_path / "tb") for name in files)
    logs = model.evaluate(x_test[:200], y_test[:200], verbose=0, return_dict=True)
    assert 0.0 <= logs["acc_adv"] <= logs["acc"] <= 1.0


def test_methods_refuse_a_backbone_they_cannot_train():
    with pytest.raises(ValueError, match="prunable=True"):
        RobustModel(models.lenet5_caffe(), get_method("anp_vs", **HPARAMS), adversary=attacks.PGD(0.3, 0.1, 1))
    with pytest.raises(ValueError, match="prunable=False"):
        RobustModel(models.lenet5_caffe(prunable=True), "at", adversary=attacks.PGD(0.3, 0.1, 1))
    with pytest.raises(ValueError, match="adversary"):
        RobustModel(models.lenet5_caffe(), "at")
    inputs = keras.Input((28, 28, 1))
    plain = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match="latent"):
        RobustModel(plain, get_method("at_vs", **HPARAMS), adversary=attacks.PGD(0.3, 0.1, 1))
    with pytest.raises(ValueError, match="num_train_examples"):
        get_method("bp")
    with pytest.raises(ValueError, match="loss"):
        RobustModel(models.lenet5_caffe(), "standard").compile("adam", loss="mse")


def test_a_plain_classifier_trains_with_the_standard_method(mnist_subset):
    """Any Keras classifier with a logits output works; it just has no latent features."""
    x, y, x_test, y_test = mnist_subset
    inputs = keras.Input((28, 28, 1))
    hidden = keras.layers.Dense(64, activation="relu")(keras.layers.Flatten()(inputs))
    model = RobustModel(keras.Model(inputs, keras.layers.Dense(10)(hidden)), "standard")
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    assert model.evaluate(x_test, y_test, verbose=0, return_dict=True)["acc"] > 0.88


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from anp_vs_tf import attacks, models
    from anp_vs_tf.trainers import RobustModel, get_method
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = RobustModel(
            models.lenet5_caffe(prunable=True),
            get_method("anp_vs", beta_kl=4.0, lambda_vs=1e-3, num_train_examples=60000),
            adversary=attacks.PGD(0.3, 0.1, 2), eval_adversary=attacks.PGD(0.3, 0.1, 2), seed=0,
        )
        model.compile(keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(0).uniform(size=(128, 28, 28, 1)).astype("float32")
    y = np.arange(128) % 10
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"],
                      "acc_adv": logs["acc_adv"]}))
    """
)


def test_training_runs_under_mirrored_strategy():
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert all(np.isfinite(out["loss"]))


def test_several_steps_per_execution_train_exactly_like_one(mnist_subset):
    """Keras' steps_per_execution only removes per-step host work: same seeds, same weights."""
    x, y, _, _ = mnist_subset
    dataset = tf.data.Dataset.from_tensor_slices((x[:1280], y[:1280])).batch(64)

    def trained(steps_per_execution):
        keras.utils.set_random_seed(0)
        method = get_method("anp_vs", beta_kl=4.0, lambda_vs=1e-3, num_train_examples=6000)
        model = RobustModel(models.lenet5_caffe(prunable=True), method,
                            adversary=attacks.PGD(0.3, 0.1, 2), seed=0)
        model.compile(keras.optimizers.Adam(1e-3), steps_per_execution=steps_per_execution)
        model.fit(dataset, epochs=1, verbose=0)
        assert int(model.optimizer.iterations) == 20
        return [v.numpy() for v in model.weights]

    for a, b in zip(trained(1), trained(10)):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_fit_on_a_data_set_does_not_warn_about_shuffle(mnist_subset):
    """A data set comes shuffled; Keras would warn on every fit that shuffle=True is ignored."""
    x, y, _, _ = mnist_subset
    dataset = tf.data.Dataset.from_tensor_slices((x[:128], y[:128])).batch(64)
    model = make_model("standard")
    model.compile(keras.optimizers.Adam(1e-3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(dataset, epochs=1, verbose=0)
    assert not [w for w in caught if "shuffle" in str(w.message)]
    assert int(model.optimizer.iterations) == 2
