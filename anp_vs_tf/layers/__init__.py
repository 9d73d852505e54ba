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
from anp_vs_tf.layers import legacy  # noqa: F401  (registers the names old files use)
from anp_vs_tf.layers.sampling import sampling
from anp_vs_tf.layers.select_features import SelectFeatures
from anp_vs_tf.layers.walk import all_layers

__all__ = [
    "all_layers",
    "BetaBernoulliDropout",
    "GaussianConv2D",
    "GaussianDense",
    "SelectFeatures",
    "beta_bernoulli_layers",
    "concrete_sample",
    "gaussian_kl",
    "gaussian_layers",
    "kumaraswamy_beta_kl",
    "kumaraswamy_sample",
    "sampling",
    "total_kl",
]
