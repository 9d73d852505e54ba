"""Keras layers of anp_vs_tf."""
from anp_vs_tf.layers.beta_bernoulli import (
    BetaBernoulliDropout,
    beta_bernoulli_layers,
    concrete_sample,
    kumaraswamy_beta_kl,
    mask_sampling,
    shared_mask_sample,
)

__all__ = [
    "BetaBernoulliDropout",
    "beta_bernoulli_layers",
    "concrete_sample",
    "kumaraswamy_beta_kl",
    "mask_sampling",
    "shared_mask_sample",
]
