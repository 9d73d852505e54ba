"""Adversarially trained Bayesian neural network (Adv-BNN; Liu et al., ICLR 2019).

The backbone has mean-field Gaussian weights (`layers.GaussianDense`,
`layers.GaussianConv2D`; build it with `bayesian_kwargs`). Training minimizes the
adversarial loss plus the KL of the weights to their Gaussian prior, scaled as in the
ANP-VS authors' implementation of this baseline: KL / (N * kl_weight). A prediction
averages the logits of `bnn_samples` weight draws, and white-box evaluation attacks
differentiate that average; training attacks a single draw, as Adv-BNN does.
"""

import keras
import tensorflow as tf

from anp_vs_tf.layers.bayesian import total_kl
from anp_vs_tf.layers.sampling import sampling
from anp_vs_tf.trainers.methods import Method, register


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class AdvBnn(Method):
    """Adv-BNN.

    Args:
        bnn_kl_weight: the KL of the weights enters the loss as KL / (N * bnn_kl_weight)
            (the authors' code uses 100).
        bnn_samples: weight draws averaged by every prediction and white-box attack.
    """

    terms = Method.terms + ("weight_kl",)

    def __init__(self, bnn_kl_weight=100.0, bnn_samples=10, **kwargs):
        super().__init__(**kwargs)
        if not bnn_kl_weight > 0:
            raise ValueError(f"bnn_kl_weight must be positive, got {bnn_kl_weight}.")
        if int(bnn_samples) != bnn_samples or bnn_samples < 1:
            raise ValueError(f"bnn_samples must be a positive integer, got {bnn_samples}.")
        if not self.num_train_examples:
            raise ValueError("at_bnn needs num_train_examples (the N that scales the weights' KL).")
        self.bnn_kl_weight = float(bnn_kl_weight)
        self.bnn_samples = int(bnn_samples)

    def adversarial_examples(self, model, x, y, seed=None):
        """Training attacks one weight draw (keyed by the step's seed, as every random
        draw in training); the averaged ensemble is what evaluation attacks."""
        def one_draw(inputs):
            with sampling(seed):
                return model.logits_and_latents(inputs, training=False)[0]

        return model.adversary(one_draw, x, y, seed)

    def losses(self, model, views, y):
        terms, classification = self.classification_loss(views, y)
        terms["weight_kl"] = total_kl(model.backbone)
        scale = 1.0 / (float(self.num_train_examples) * self.bnn_kl_weight)
        terms["loss"] = classification + scale * terms["weight_kl"]
        return terms

    def inference_outputs(self, model, x):
        """Logits averaged over `bnn_samples` weight draws; latents of the first draw."""
        logits, latents = model.logits_and_latents(x, training=False)
        if self.bnn_samples == 1:
            return logits, latents

        def body(k, total):
            return k + 1, total + model.logits_and_latents(x, training=False)[0]

        _, total = tf.while_loop(
            lambda k, _: k < self.bnn_samples - 1, body, (tf.constant(0), logits),
            maximum_iterations=self.bnn_samples - 1,
        )
        return total / self.bnn_samples, latents

    def get_config(self):
        return {**super().get_config(), "bnn_kl_weight": self.bnn_kl_weight, "bnn_samples": self.bnn_samples}


register("at_bnn", AdvBnn, adversarial=True, bayesian=True)
