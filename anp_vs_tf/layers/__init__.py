"""Keras layers of anp_vs_tf: Beta-Bernoulli masks and mean-field Gaussian weights."""
from anp_vs_tf.layers.bayesian import (
    GaussianConv2D,
    GaussianDense,
    gaussian_kl,
    gaussian_layers,
    total_kl,
)
from anp_vs_tf.layers.beta_bernoulli import (
    BetaBernoulliDropout,
    beta_bernoulli_layers,
    concrete_sample,
    kumaraswamy_beta_kl,
    kumaraswamy_sample,
)
from anp_vs_tf.layers.fused_batch_norm import FusedBatchNormalization
from anp_vs_tf.layers.input_conv import InputConv2D
from anp_vs_tf.layers.same_conv import SameConv2D, SmallMapConv2D
from anp_vs_tf.layers.sampling import sampling
from anp_vs_tf.layers.select_features import SelectFeatures
from anp_vs_tf.layers.walk import all_layers

# Conv2D subclasses that change only how TensorFlow computes the convolution: folding
# and export treat them as the plain keras.layers.Conv2D they equal.
FAST_CONV2D_LAYERS = (InputConv2D, SameConv2D, SmallMapConv2D)

__all__ = [
    "all_layers",
    "BetaBernoulliDropout",
    "FusedBatchNormalization",
    "GaussianConv2D",
    "GaussianDense",
    "FAST_CONV2D_LAYERS",
    "InputConv2D",
    "SameConv2D",
    "SelectFeatures",
    "SmallMapConv2D",
    "beta_bernoulli_layers",
    "concrete_sample",
    "gaussian_kl",
    "gaussian_layers",
    "kumaraswamy_beta_kl",
    "kumaraswamy_sample",
    "sampling",
    "total_kl",
]
