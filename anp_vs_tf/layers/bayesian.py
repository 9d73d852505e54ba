"""Mean-field Gaussian (Bayesian) layers for the Adv-BNN baseline (Liu et al., ICLR 2019).

Every weight w (kernel and bias) has its own variational posterior N(mu, sigma^2),
sigma = softplus(rho), and a N(0, prior_stddev^2) prior. Each call draws one weight
sample, w = mu + sigma * eps, shared by the whole batch, in training and at inference
alike: a call is one member of the ensemble the posterior defines, and Adv-BNN predicts
by averaging the outputs of several calls. Training minimizes the (adversarial) loss
plus the KL of posterior to prior (scaled by the data set size: the negative ELBO).
"""

import keras
import numpy as np
import tensorflow as tf

from anp_vs_tf import seeds
from anp_vs_tf.layers.sampling import current_scope
from anp_vs_tf.layers.walk import all_layers


def gaussian_kl(mu, sigma, prior_stddev):
    """KL(N(mu, sigma^2) || N(0, prior_stddev^2)), elementwise, in closed form:

        log(prior_stddev / sigma) + (sigma^2 + mu^2) / (2 prior_stddev^2) - 1/2.
    """
    mu = tf.convert_to_tensor(mu)
    sigma = tf.convert_to_tensor(sigma, dtype=mu.dtype)
    prior_stddev = tf.cast(tf.convert_to_tensor(prior_stddev, dtype_hint=mu.dtype), mu.dtype)
    return (
        tf.math.log(prior_stddev / sigma)
        + (tf.square(sigma) + tf.square(mu)) / (2.0 * tf.square(prior_stddev))
        - 0.5
    )


def _pair(value, name):
    """An int or a pair of ints as a tuple of two positive ints."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}.")
    return tuple(int(v) for v in pair)


class _GaussianLayer(keras.layers.Layer):
    """The posterior over (kernel, bias), its prior, sampling and KL, shared by the layers.

    The posterior variables are created with autocast=False, so under a mixed-precision
    policy the weights are sampled (and the KL computed) in float32 and only the sample
    is cast to the compute dtype.
    """

    def __init__(self, activation, use_bias, prior_stddev, init_rho, seed, **kwargs):
        super().__init__(**kwargs)
        if not prior_stddev > 0:
            raise ValueError(f"prior_stddev must be positive, got {prior_stddev}.")
        if not np.isfinite(init_rho):
            raise ValueError(f"init_rho must be finite, got {init_rho}.")
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.prior_stddev = float(prior_stddev)
        self.init_rho = float(init_rho)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _build_posterior(self, kernel_shape, bias_shape):
        def add(name, shape, initializer):
            return self.add_weight(name=name, shape=shape, initializer=initializer, autocast=False)

        rho = keras.initializers.Constant(self.init_rho)
        self.kernel_mu = add("kernel_mu", kernel_shape, "glorot_uniform")
        self.kernel_rho = add("kernel_rho", kernel_shape, rho)
        if self.use_bias:
            self.bias_mu = add("bias_mu", bias_shape, "zeros")
            self.bias_rho = add("bias_rho", bias_shape, rho)
        else:
            self.bias_mu = self.bias_rho = None

    def _posterior_variables(self):
        """[(mu, rho)] for the kernel and, with use_bias, the bias."""
        pairs = [(self.kernel_mu, self.kernel_rho)]
        if self.use_bias:
            pairs.append((self.bias_mu, self.bias_rho))
        return pairs

    def mean_weights(self):
        """(kernel_mu, bias_mu) as tensors; bias_mu is None without a bias."""
        means = [tf.convert_to_tensor(mu) for mu, _ in self._posterior_variables()]
        return means[0], (means[1] if self.use_bias else None)

    def posterior_stddev(self):
        """(kernel sigma, bias sigma) = softplus(rho); bias sigma is None without a bias."""
        sigmas = [tf.nn.softplus(rho) for _, rho in self._posterior_variables()]
        return sigmas[0], (sigmas[1] if self.use_bias else None)

    def kl_divergence(self):
        """Sum over all weights of KL(N(mu, sigma^2) || N(0, prior_stddev^2)), float32 scalar."""
        return tf.add_n(
            [
                tf.reduce_sum(gaussian_kl(tf.convert_to_tensor(mu), tf.nn.softplus(rho), self.prior_stddev))
                for mu, rho in self._posterior_variables()
            ]
        )

    def sample_weights(self, seed=None):
        """One posterior draw (kernel, bias), reparameterized, in the variables' dtype.

        `seed` is a stateless seed; without it the layer's own seed generator is used,
        so every call draws a new network and the draws are reproducible given the
        layer's seed. bias is None without a bias.
        """
        if seed is None:
            seed = self.seed_generator.next()
        seed = seeds.int32_seed(seed)
        samples = []
        for (mu, rho), part_seed in zip(self._posterior_variables(), tf.unstack(seeds.split(seed, 2))):
            mu = tf.convert_to_tensor(mu)
            eps = tf.random.stateless_normal(tf.shape(mu), seed=part_seed, dtype=mu.dtype)
            samples.append(mu + tf.nn.softplus(rho) * eps)
        return samples[0], (samples[1] if self.use_bias else None)

    def _scope_seed(self):
        """The step's seed for this layer inside a keyed `layers.sampling` block, else None."""
        scope = current_scope()
        return scope.layer_seed(self) if scope is not None else None

    def _finish(self, outputs, bias):
        if bias is not None:
            outputs = tf.nn.bias_add(outputs, tf.cast(bias, outputs.dtype))
        return self.activation(outputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
            prior_stddev=self.prior_stddev,
            init_rho=self.init_rho,
            seed=self.seed,
        )
        return config


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class GaussianDense(_GaussianLayer):
    """A dense layer whose weights are drawn from a mean-field Gaussian posterior at every call.

    Args:
        units: number of output units.
        activation, use_bias: as in keras.layers.Dense.
        prior_stddev: standard deviation of the N(0, prior_stddev^2) prior on every
            weight (the authors: 1.0 for LeNet, 0.1 for VGG).
        init_rho: initial rho of every weight, sigma = softplus(rho) (the authors: -3
            for LeNet, -5 for VGG). mu starts as in keras.layers.Dense (Glorot-uniform
            kernel, zero bias).
        seed: seed of the layer's own random stream.
    """

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        prior_stddev=1.0,
        init_rho=-3.0,
        seed=None,
        **kwargs,
    ):
        if not (isinstance(units, (int, np.integer)) and units > 0):
            raise ValueError(f"units must be a positive int, got {units!r}.")
        super().__init__(activation, use_bias, prior_stddev, init_rho, seed, **kwargs)
        self.units = int(units)

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"{self.name}: GaussianDense expects inputs of rank >= 2 with a known last "
                f"axis, got shape {tuple(input_shape)}."
            )
        self._build_posterior((int(input_shape[-1]), self.units), (self.units,))

    def call(self, inputs):
        kernel, bias = self.sample_weights(self._scope_seed())
        return self._finish(tf.matmul(inputs, tf.cast(kernel, inputs.dtype)), bias)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units)
        return config


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class GaussianConv2D(_GaussianLayer):
    """A channel-last 2D convolution whose kernel and bias are drawn from a mean-field
    Gaussian posterior at every call.

    Args:
        filters: number of output channels.
        kernel_size, strides: an int or a pair of ints (height, width).
        padding: "valid" or "same".
        activation, use_bias, prior_stddev, init_rho, seed: as in `GaussianDense`
            (mu starts as in keras.layers.Conv2D).
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        activation=None,
        use_bias=True,
        prior_stddev=1.0,
        init_rho=-3.0,
        seed=None,
        **kwargs,
    ):
        if not (isinstance(filters, (int, np.integer)) and filters > 0):
            raise ValueError(f"filters must be a positive int, got {filters!r}.")
        padding = str(padding).lower()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}.")
        kernel_size = _pair(kernel_size, "kernel_size")
        strides = _pair(strides, "strides")
        super().__init__(activation, use_bias, prior_stddev, init_rho, seed, **kwargs)
        self.filters = int(filters)
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                f"{self.name}: GaussianConv2D expects channel-last (N, H, W, C) inputs with a "
                f"known channel axis, got shape {tuple(input_shape)}."
            )
        kernel_shape = self.kernel_size + (int(input_shape[-1]), self.filters)
        self._build_posterior(kernel_shape, (self.filters,))

    def call(self, inputs):
        kernel, bias = self.sample_weights(self._scope_seed())
        outputs = tf.nn.conv2d(
            inputs, tf.cast(kernel, inputs.dtype), strides=self.strides, padding=self.padding.upper()
        )
        return self._finish(outputs, bias)

    def compute_output_shape(self, input_shape):
        spatial = []
        for size, kernel, stride in zip(input_shape[1:3], self.kernel_size, self.strides):
            if size is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-size // stride))
            else:
                spatial.append((size - kernel) // stride + 1)
        return (input_shape[0], *spatial, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
        )
        return config


def gaussian_layers(model):
    """All `GaussianDense` and `GaussianConv2D` layers of a model, nested models included, in order."""
    return [layer for layer in all_layers(model) if isinstance(layer, _GaussianLayer)]


def total_kl(model):
    """Sum of the KL divergences of a model's Gaussian layers (a float32 zero without any)."""
    kls = [layer.kl_divergence() for layer in gaussian_layers(model)]
    return tf.add_n(kls) if kls else tf.constant(0.0)
