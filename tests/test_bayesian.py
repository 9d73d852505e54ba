"""The mean-field Gaussian layers against independent computations."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from anp_vs_tf.layers.bayesian import (
    GaussianConv2D,
    GaussianDense,
    gaussian_kl,
    gaussian_layers,
    total_kl,
)

tfd = tfp.distributions

# (mu, sigma, prior_stddev): narrow and wide posteriors, the LeNet and VGG priors.
KL_SETTINGS = [(0.3, 0.05, 1.0), (-1.2, 0.5, 1.0), (0.05, 0.01, 0.1), (0.1, 0.2, 0.1)]


def softplus_inverse(x):
    return np.log(np.expm1(x))


def make_dense(units=3, inputs=4, sigma=None, seed=7, **kwargs):
    layer = GaussianDense(units, seed=seed, **kwargs)
    layer.build((None, inputs))
    if sigma is not None:
        rng = np.random.default_rng(0)
        layer.kernel_rho.assign(softplus_inverse(rng.uniform(*sigma, size=(inputs, units))))
        layer.bias_mu.assign(rng.normal(size=units))
        layer.bias_rho.assign(softplus_inverse(rng.uniform(*sigma, size=units)))
    return layer


def draw_outputs(layer, x, n):
    """n calls of the layer on x inside one tf.function: n networks from the posterior."""

    @tf.function
    def draws():
        outputs = tf.TensorArray(tf.float32, size=n)
        for i in tf.range(n):
            outputs = outputs.write(i, layer(x))
        return outputs.stack()

    return draws().numpy().astype(np.float64)


@pytest.mark.parametrize("mu,sigma,prior", KL_SETTINGS)
def test_closed_form_kl_matches_tfp_and_monte_carlo(mu, sigma, prior):
    """KL(q || p) = E_q[log q - log p], estimated with 20,000 samples (TFP log densities, float64)."""
    q = tfd.Normal(tf.constant(mu, tf.float64), tf.constant(sigma, tf.float64))
    p = tfd.Normal(tf.constant(0.0, tf.float64), tf.constant(prior, tf.float64))
    w = q.sample(20_000, seed=(3, 5))
    monte_carlo = float(tf.reduce_mean(q.log_prob(w) - p.log_prob(w)))
    closed = float(gaussian_kl(tf.constant(mu, tf.float64), tf.constant(sigma, tf.float64), prior))
    assert closed == pytest.approx(monte_carlo, rel=0.05)
    assert closed == pytest.approx(float(q.kl_divergence(p)), rel=1e-10)


def test_layer_kl_is_the_sum_over_all_weights():
    layer = make_dense(units=5, inputs=6, sigma=(0.01, 0.8), prior_stddev=0.1)
    mus = [layer.kernel_mu.numpy(), layer.bias_mu.numpy()]
    sigmas = [np.log1p(np.exp(v.numpy().astype(np.float64))) for v in (layer.kernel_rho, layer.bias_rho)]
    s = 0.1
    expected = sum(
        np.sum(np.log(s / sg) + (sg**2 + m**2) / (2 * s**2) - 0.5) for m, sg in zip(mus, sigmas)
    )
    assert float(layer.kl_divergence()) == pytest.approx(expected, rel=1e-5)


def test_initial_posterior_follows_keras_defaults_and_init_rho():
    layer = make_dense(units=20, inputs=30, init_rho=-5.0)
    kernel_mu, bias_mu = (t.numpy() for t in layer.mean_weights())
    limit = np.sqrt(6.0 / (30 + 20))  # Glorot uniform
    assert np.all(np.abs(kernel_mu) <= limit) and kernel_mu.std() > limit / 3
    np.testing.assert_array_equal(bias_mu, 0.0)
    for sigma in layer.posterior_stddev():
        np.testing.assert_allclose(sigma.numpy(), np.log1p(np.exp(-5.0)), rtol=1e-5)
    assert [v.name for v in layer.trainable_variables] == ["kernel_mu", "kernel_rho", "bias_mu", "bias_rho"]


def test_outputs_vary_between_calls_and_are_reproducible_for_a_seed():
    first, second = make_dense(seed=11), make_dense(seed=11)
    second.set_weights(first.get_weights())
    x = tf.random.uniform((5, 4), seed=1)
    a1, a2 = first(x).numpy(), first(x).numpy()
    b1, b2 = second(x).numpy(), second(x).numpy()
    assert not np.allclose(a1, a2)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    # An explicit stateless seed gives the same network every time.
    k1, _ = first.sample_weights(seed=tf.constant([4, 2]))
    k2, _ = second.sample_weights(seed=tf.constant([4, 2]))
    np.testing.assert_array_equal(k1.numpy(), k2.numpy())


def test_one_weight_sample_is_shared_by_the_batch():
    layer = make_dense(sigma=(0.3, 0.6))
    y = layer(tf.ones((8, 4))).numpy()
    np.testing.assert_array_equal(y, np.broadcast_to(y[:1], y.shape))


def test_calls_inside_one_tf_function_draw_different_networks():
    """What the trainer's prediction averaging relies on."""
    layer = make_dense(sigma=(0.1, 0.2))
    y = draw_outputs(layer, tf.ones((1, 4)), 10)
    assert len(np.unique(y[:, 0, 0])) == 10


def test_dense_output_mean_and_variance_match_the_posterior():
    """E[y] = x mu_W + mu_b and Var[y_j] = sum_i x_i^2 sigma_ij^2 + sigma_bj^2."""
    n = 4000
    layer = make_dense(units=2, inputs=4, sigma=(0.1, 0.6))
    x = np.array([[1.0, -0.5, 2.0, 0.3], [0.0, 1.5, -1.0, 0.7]], np.float32)
    y = draw_outputs(layer, tf.constant(x), n)
    kernel_mu, bias_mu = (v.numpy().astype(np.float64) for v in (layer.kernel_mu, layer.bias_mu))
    kernel_sigma, bias_sigma = (
        np.log1p(np.exp(v.numpy().astype(np.float64))) for v in (layer.kernel_rho, layer.bias_rho)
    )
    mean = x @ kernel_mu + bias_mu
    variance = (x.astype(np.float64) ** 2) @ kernel_sigma**2 + bias_sigma**2
    np.testing.assert_array_less(np.abs(y.mean(0) - mean), 4 * np.sqrt(variance / n))
    # The sample variance of n normal draws has relative standard error sqrt(2 / (n - 1)).
    np.testing.assert_allclose(y.var(0, ddof=1), variance, rtol=4 * np.sqrt(2 / (n - 1)))


def test_conv_output_mean_matches_the_mean_kernel():
    n = 2000
    layer = GaussianConv2D(3, 3, strides=2, padding="same", seed=4, init_rho=-1.0)
    x = tf.random.uniform((2, 7, 7, 2), -1.0, 1.0, seed=6)
    layer.build(x.shape)
    layer.bias_mu.assign([0.5, -0.2, 0.1])
    y = draw_outputs(layer, x, n)
    kernel_mu, bias_mu = layer.mean_weights()
    expected = (tf.nn.conv2d(x, kernel_mu, strides=2, padding="SAME") + bias_mu).numpy()
    standard_error = y.std(0, ddof=1) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(y.mean(0) - expected), 4 * standard_error)


@pytest.mark.parametrize(
    "kernel_size,strides,padding",
    [(3, 1, "valid"), (3, 2, "same"), ((5, 3), (2, 3), "valid"), (2, 2, "same")],
)
def test_conv_output_shape_matches_keras(kernel_size, strides, padding):
    x = tf.zeros((2, 11, 9, 3))
    ours = GaussianConv2D(4, kernel_size, strides=strides, padding=padding, seed=0)
    reference = keras.layers.Conv2D(4, kernel_size, strides=strides, padding=padding)
    assert ours.compute_output_shape(x.shape) == reference.compute_output_shape(x.shape)
    assert tuple(ours(x).shape) == tuple(reference(x).shape)


def test_gradients_reach_all_four_variables():
    for layer, x in [
        (make_dense(units=3, inputs=4), tf.random.uniform((6, 4), seed=2)),
        (GaussianConv2D(3, 2, seed=1), tf.random.uniform((2, 5, 5, 2), seed=3)),
    ]:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x))) + layer.kl_divergence()
        grads = tape.gradient(loss, layer.trainable_variables)
        assert len(grads) == 4
        for grad in grads:
            assert grad is not None and np.all(np.isfinite(grad.numpy())) and np.any(grad.numpy() != 0)


def test_without_bias():
    layer = make_dense(use_bias=False)
    assert [v.name for v in layer.trainable_variables] == ["kernel_mu", "kernel_rho"]
    assert layer.mean_weights()[1] is None and layer.posterior_stddev()[1] is None
    mu, sigma = layer.kernel_mu.numpy(), np.log1p(np.exp(layer.kernel_rho.numpy()))
    expected = np.sum(np.log(1.0 / sigma) + (sigma**2 + mu**2) / 2 - 0.5)
    assert float(layer.kl_divergence()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_samples_in_float32(policy):
    layer = GaussianConv2D(3, 3, padding="same", activation="relu", seed=0, dtype=policy)
    x = tf.random.uniform((2, 6, 6, 2), seed=4)
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32)) + layer.kl_divergence()
    assert y.dtype == layer.compute_dtype and layer.kernel_mu.dtype == "float32"
    assert layer.kl_divergence().dtype == tf.float32
    assert all(np.all(np.isfinite(g.numpy())) for g in tape.gradient(loss, layer.trainable_variables))


def two_layer_model():
    inputs = keras.Input((6, 6, 2))
    hidden = GaussianConv2D(
        3, 3, strides=(1, 2), padding="same", activation="relu", prior_stddev=0.1, init_rho=-5.0, seed=1,
        name="conv",
    )(inputs)
    outputs = GaussianDense(4, prior_stddev=0.5, seed=2, name="dense")(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs)


def test_works_under_a_distribution_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = two_layer_model()
    x = tf.random.uniform((3, 6, 6, 2), seed=5)

    @tf.function
    def step():
        def replica_step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x)) + total_kl(model)
            return loss, tape.gradient(loss, model.trainable_variables)

        return strategy.run(replica_step)

    (loss_1, grads), (loss_2, _) = step(), step()
    assert np.isfinite(float(loss_1)) and float(loss_1) != float(loss_2)
    assert len(grads) == 8 and all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_config_round_trip_inside_a_saved_model(tmp_path):
    """Weights and config survive saving. Keras saves the seed (config), not the seed
    generator's state, so a loaded layer restarts its stream: the first call of the
    loaded model equals the first call of a model saved before any call."""
    model = two_layer_model()
    model.get_layer("dense").kernel_rho.assign(tf.fill((54, 4), -2.0))
    path = tmp_path / "bnn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for name in ("conv", "dense"):
        ours, theirs = model.get_layer(name), loaded.get_layer(name)
        assert type(theirs) is type(ours) and theirs.get_config() == ours.get_config()
        for a, b in zip(ours.weights, theirs.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    conv = loaded.get_layer("conv")
    assert (conv.strides, conv.padding, conv.prior_stddev, conv.init_rho) == ((1, 2), "same", 0.1, -5.0)
    x = np.random.default_rng(0).uniform(size=(2, 6, 6, 2)).astype("float32")
    np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())


def test_gaussian_layers_and_total_kl_find_nested_layers():
    inner = two_layer_model()
    inputs = keras.Input((6, 6, 2))
    outputs = GaussianDense(2, seed=3, name="head")(keras.layers.Dense(5)(inner(inputs)))
    model = keras.Model(inputs, outputs)
    layers = gaussian_layers(model)
    assert [layer.name for layer in layers] == ["conv", "dense", "head"]
    expected = sum(float(layer.kl_divergence()) for layer in layers)
    assert float(total_kl(model)) == pytest.approx(expected, rel=1e-6)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert gaussian_layers(plain) == [] and float(total_kl(plain)) == 0.0


def test_bad_arguments_and_shapes_are_refused():
    for units in (0, -3, 2.5):
        with pytest.raises(ValueError, match="units must be a positive int"):
            GaussianDense(units)
    with pytest.raises(ValueError, match="filters must be a positive int"):
        GaussianConv2D(0, 3)
    for prior in (0.0, -1.0):
        with pytest.raises(ValueError, match="prior_stddev must be positive"):
            GaussianDense(2, prior_stddev=prior)
        with pytest.raises(ValueError, match="prior_stddev must be positive"):
            GaussianConv2D(2, 3, prior_stddev=prior)
    with pytest.raises(ValueError, match="init_rho must be finite"):
        GaussianDense(2, init_rho=float("nan"))
    with pytest.raises(ValueError, match="padding"):
        GaussianConv2D(2, 3, padding="causal")
    with pytest.raises(ValueError, match="kernel_size"):
        GaussianConv2D(2, 0)
    with pytest.raises(ValueError, match="strides"):
        GaussianConv2D(2, 3, strides=(1, 2, 3))
    with pytest.raises(ValueError, match="channel-last"):
        GaussianConv2D(2, 3)(tf.ones((2, 5, 5)))
    with pytest.raises(ValueError, match="rank >= 2"):
        GaussianDense(2)(tf.ones((3,)))
