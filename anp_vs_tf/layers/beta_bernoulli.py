"""Beta-Bernoulli dropout (Lee et al., 2018): a learned keep probability per unit.

Each unit (the last axis: a neuron of a dense layer or a channel of a channel-last
feature map) has a keep probability pi ~ Beta(alpha, 1) a priori and a mask
z ~ Bernoulli(pi). The variational posterior of pi is Kumaraswamy(a, b), a close
cousin of the Beta whose reparameterized samples and KL to a Beta(alpha, 1) prior
are both in closed form. A small alpha puts most prior mass near pi = 0, so units
that do not earn their keep are switched off for good: that is the pruning.

A layer can also be *frozen* (`freeze`): its mask becomes a fixed vector, E_q[pi] for the
units it keeps and exactly 0 for the rest, in training as at inference, so the kept
weights can be fine-tuned on the pruned network (`trainers.compression`).
"""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from anp_vs_tf import seeds
from anp_vs_tf.distribute import replica_rows
from anp_vs_tf.layers.sampling import current_scope
from anp_vs_tf.layers.walk import all_layers

tfd = tfp.distributions

EULER_GAMMA = 0.5772156649015329

# Bounds on the unconstrained parameters, as in the authors' code: below
# softplus(-10) a unit is pruned anyway, and these keep digamma, lgamma and
# the 1/a terms of the KL finite.
_A_UC_MIN = -10.0
_B_UC_MIN, _B_UC_MAX = -10.0, 50.0
# pi is kept this far from {0, 1} so that its logit stays finite.
_PI_EPS = 1e-6
# The uniform noise of a Kumaraswamy draw is kept this far from {0, 1} (see below).
_U_EPS = 1e-6


def _softplus_inverse(value):
    return float(np.log(np.expm1(value)))


def kumaraswamy_beta_kl(a, b, alpha):
    """KL(Kumaraswamy(a, b) || Beta(alpha, 1)), elementwise, in closed form.

    Nalisnick & Smyth (2017), eq. 11: the series term of the general formula
    carries a factor (beta - 1) and vanishes for the Beta(alpha, 1) prior, leaving

        (1 - alpha/a) (-gamma - digamma(b) - 1/b) + log(a b / alpha) - (b - 1)/b.
    """
    a = tf.convert_to_tensor(a)
    b = tf.convert_to_tensor(b, dtype=a.dtype)
    alpha = tf.cast(alpha, a.dtype)
    return (
        (1.0 - alpha / a) * (-EULER_GAMMA - tf.math.digamma(b) - 1.0 / b)
        + tf.math.log(a * b / alpha)
        - (b - 1.0) / b
    )


def kumaraswamy_sample(a, b, uniform):
    """Kumaraswamy(a, b) draws from uniform noise, differentiable in a and b.

    The inverse CDF (1 - (1 - u)^(1/b))^(1/a), in log space, with u kept off {0, 1}.
    tfd.Kumaraswamy.sample computes the same inverse CDF, but a draw of u = 0 (about
    one in 10^7) makes its gradient with respect to a 0 * inf = NaN once a unit is pruned
    (a near alpha): over the ~10^7 draws of a 16-epoch LeNet run that happens.
    """
    u = tf.clip_by_value(uniform, _U_EPS, 1.0 - _U_EPS)
    log_pi = tf.math.log(-tf.math.expm1(tf.math.log1p(-u) / b)) / a
    return tf.exp(log_pi)


def concrete_sample(pi, temperature, batch_size, seed):
    """`batch_size` relaxed Bernoulli(pi) draws at `temperature`: shape (batch_size,) + pi.shape.

    Concrete(pi, t) = sigmoid(Logistic(logit(pi)/t, 1/t)), the distribution of
    tfd.RelaxedBernoulli. Sampling the logistic and squashing here, rather than calling
    RelaxedBernoulli.sample, keeps the gradient finite where the sigmoid saturates
    (TFP's sigmoid bijector gives NaN there, and at t = 0.1 it saturates often).
    The logistic noise is what `tfd.Logistic(loc, scale).sample(n, seed=seed)` computes,
    from the same uniform draw, with the uniform of `seeds.stateless_uniform` so that
    it is the same under XLA (the log and log1p of it then agree to float rounding).
    """
    pi = tf.clip_by_value(pi, _PI_EPS, 1.0 - _PI_EPS)
    logits = tf.math.log(pi) - tf.math.log1p(-pi)
    loc = logits / temperature
    scale = tf.constant(1.0 / temperature, tf.float32)

    def logistic(n):
        # As TFP's Logistic: u in (0, 1), from its smallest normal float up.
        u = seeds.stateless_uniform(tf.concat([[n], tf.shape(loc)], 0), seed,
                                         minval=np.finfo(np.float32).tiny, maxval=1.0)
        return (tf.math.log(u) - tf.math.log1p(-u)) * scale + loc

    # Each example's noise is its row of a draw for the global batch, whatever the
    # number of replicas (see distribute.replica_rows).
    return tf.sigmoid(replica_rows(logistic, batch_size))


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class BetaBernoulliDropout(keras.layers.Layer):
    """Multiplies each unit of the last axis by a learned Beta-Bernoulli mask.

    Training: pi ~ Kumaraswamy(a, b) (one draw per batch, reparameterized), then a
    relaxed Bernoulli mask z ~ Concrete(pi, temperature) for every example, so the
    gradient reaches a and b. Inference: the deterministic E_q[pi], with units whose
    E_q[pi] is below `threshold` set to exactly zero. Frozen (after `freeze`): the
    fixed mask it was frozen with, in training and at inference alike.

    Args:
        alpha: concentration of the Beta(alpha, 1) prior on pi; small means sparse.
        temperature: temperature of the concrete relaxation of the Bernoulli mask.
        threshold: units with E_q[pi] below this are pruned at inference.
        a_init, b_init: initial Kumaraswamy parameters (positive). The defaults
            (a = softplus(-1), b = 1, so E_q[pi] ~ 0.24) are the authors' LeNet values.
        seed: seed of the layer's own random stream.
    """

    def __init__(
        self,
        alpha=1e-4,
        temperature=0.1,
        threshold=1e-3,
        a_init=0.31326169,
        b_init=1.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}.")
        if not (a_init > 0 and b_init > 0):
            raise ValueError(f"a_init and b_init must be positive, got {a_init}, {b_init}.")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.a_init = float(a_init)
        self.b_init = float(b_init)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) not in (2, 4):
            raise ValueError(
                f"{self.name}: BetaBernoulliDropout expects dense (N, C) or channel-last "
                f"conv (N, H, W, C) activations, got shape {tuple(input_shape)}."
            )
        units = input_shape[-1]
        if units is None:
            raise ValueError(f"{self.name}: the last (unit) axis must have a known size.")
        self.units = int(units)
        self.a_uc = self.add_weight(
            name="a_uc",
            shape=(self.units,),
            initializer=keras.initializers.Constant(_softplus_inverse(self.a_init)),
            autocast=False,
        )
        self.b_uc = self.add_weight(
            name="b_uc",
            shape=(self.units,),
            initializer=keras.initializers.Constant(_softplus_inverse(self.b_init)),
            autocast=False,
        )
        # The hard mask of a frozen layer, and whether it is frozen (0 or 1): state, not
        # parameters, so no optimizer touches them; saved with the layer.
        self.frozen_mask = self.add_weight(
            name="frozen_mask", shape=(self.units,), initializer="ones", trainable=False, autocast=False,
        )
        self.frozen = self.add_weight(
            name="frozen", shape=(), initializer="zeros", trainable=False, autocast=False,
        )

    def load_own_variables(self, store):
        """Load a saved layer; one saved before layers could be frozen (a and b only) loads unfrozen."""
        if len(store.keys()) == 2:
            self.a_uc.assign(store["0"])
            self.b_uc.assign(store["1"])
            return
        super().load_own_variables(store)

    # -- the variational posterior and what callers read off it ------------------

    @property
    def mask_variables(self):
        """The variables the mask optimizer trains (a and b, unconstrained)."""
        return [self.a_uc, self.b_uc]

    def concentrations(self):
        """(a, b) of the Kumaraswamy posterior, as float32 tensors."""
        a = tf.nn.softplus(tf.maximum(tf.convert_to_tensor(self.a_uc), _A_UC_MIN))
        b = tf.nn.softplus(tf.clip_by_value(tf.convert_to_tensor(self.b_uc), _B_UC_MIN, _B_UC_MAX))
        return a, b

    def posterior(self):
        """q(pi) = Kumaraswamy(a, b), one per unit."""
        a, b = self.concentrations()
        return tfd.Kumaraswamy(concentration1=a, concentration0=b)

    def keep_probability(self):
        """E_q[pi] per unit: the deterministic mask value before thresholding."""
        return self.posterior().mean()

    def is_frozen(self):
        """Boolean scalar: whether the mask is the fixed one `freeze` set."""
        return tf.convert_to_tensor(self.frozen) > 0.5

    def active_mask(self):
        """Boolean per unit: True where the unit survives (E_q[pi] >= threshold; frozen:
        the units the layer was frozen with)."""
        return tf.where(self.is_frozen(), tf.convert_to_tensor(self.frozen_mask) > 0.0,
                        self.keep_probability() >= self.threshold)

    def num_active(self):
        """Number of units that survive pruning (int32 scalar)."""
        return tf.reduce_sum(tf.cast(self.active_mask(), tf.int32))

    def inference_mask(self):
        """The mask applied at inference: E_q[pi], exactly zero for pruned units (frozen:
        the fixed mask)."""
        keep = self.keep_probability()
        learned = tf.where(keep >= self.threshold, keep, tf.zeros_like(keep))
        return tf.where(self.is_frozen(), tf.convert_to_tensor(self.frozen_mask), learned)

    def freeze(self, keep=None):
        """Fix the mask for good: E_q[pi] on the units `keep` selects (bool per unit;
        default the active ones), exactly 0 elsewhere. From then on the layer ignores a
        and b, in training too, and `RobustModel` no longer trains them."""
        keep = self.active_mask() if keep is None else tf.convert_to_tensor(keep, tf.bool)
        if keep.shape != (self.units,):
            raise ValueError(f"{self.name}: keep must have one entry per unit ({self.units}), got shape {keep.shape}.")
        probability = self.keep_probability()
        self.frozen_mask.assign(tf.where(keep, probability, tf.zeros_like(probability)))
        self.frozen.assign(1.0)

    def kl_divergence(self):
        """sum over units of KL(q(pi) || p(pi)); the Bernoulli part of the KL is zero."""
        # No tfd.Beta prior object: TFP has no KL(Kumaraswamy || Beta), so this is the closed form.
        a, b = self.concentrations()
        return tf.reduce_sum(kumaraswamy_beta_kl(a, b, self.alpha))

    # -- the forward pass --------------------------------------------------------

    def sample_mask(self, batch_size, seed=None):
        """A training mask of shape (batch_size, units): near-binary, differentiable in a, b.

        `seed` is a stateless seed; without it the layer's own seed generator is used.
        """
        if seed is None:
            seed = self.seed_generator.next()
        seed = seeds.int32_seed(seed)
        pi_seed, z_seed = tf.unstack(seeds.split(seed, 2))
        a, b = self.concentrations()
        pi = kumaraswamy_sample(a, b, seeds.stateless_uniform(tf.shape(a), pi_seed))
        return concrete_sample(pi, self.temperature, batch_size, z_seed)

    def _training_mask(self, batch_size):
        scope = current_scope()
        if scope is None:
            return self.sample_mask(batch_size)
        seed = scope.layer_seed(self)
        if scope.shared_batch_size is None:
            return self.sample_mask(batch_size, seed)
        if id(self) not in scope.shared:
            scope.shared[id(self)] = self.sample_mask(scope.shared_batch_size, seed)
        mask = scope.shared[id(self)]
        views = batch_size // tf.shape(mask)[0]
        return tf.tile(mask, tf.stack([views, 1]))

    def call(self, inputs, training=False):
        scope = current_scope()
        if training or (scope is not None and scope.at_inference):
            mask = self._training_mask(tf.shape(inputs)[0])
            mask = tf.where(self.is_frozen(), tf.convert_to_tensor(self.frozen_mask)[None], mask)
            mask = tf.reshape(mask, [-1] + [1] * (len(inputs.shape) - 2) + [self.units])
        else:
            mask = self.inference_mask()
        return inputs * tf.cast(mask, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            alpha=self.alpha,
            temperature=self.temperature,
            threshold=self.threshold,
            a_init=self.a_init,
            b_init=self.b_init,
            seed=self.seed,
        )
        return config


def beta_bernoulli_layers(model):
    """All `BetaBernoulliDropout` layers of a model, nested models included, in order."""
    return [layer for layer in all_layers(model) if isinstance(layer, BetaBernoulliDropout)]
