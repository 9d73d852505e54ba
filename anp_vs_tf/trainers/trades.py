"""TRADES (Zhang et al., 2019): accuracy plus a KL that keeps adversarial predictions close.

    loss = CE(f(x), y) + beta_trades * KL(f(x) || f(x~)),  x~ = argmax KL(f(x) || f(x'))

The attack maximizes the KL to the clean prediction (not the cross-entropy to the
label) with the model's PGD settings, starting 0.001 away from x as TRADES does.
"""

import keras
import tensorflow as tf

from anp_vs_tf.metrics.vulnerability import network_vulnerability
from anp_vs_tf.trainers.methods import Method, mean_cross_entropy, register


def kl_from_clean(clean_probabilities, logits):
    """Per-example KL(p_clean || softmax(logits)): the loss TRADES' attack maximizes
    (an attack's `loss_fn(y, logits)`).

    The clean probabilities come in as the attack's target (its `y`), row by row with
    the images, so that an attack that splits the batch (PGD's chunks) splits them too."""
    log_p = tf.math.log(tf.maximum(clean_probabilities, 1e-12))
    log_q = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    return tf.reduce_sum(clean_probabilities * (log_p - log_q), axis=-1)


def prediction_kl(logits, logits_adv):
    """Batch mean of KL(softmax(logits) || softmax(logits_adv)), differentiable in both."""
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    log_q = tf.nn.log_softmax(tf.cast(logits_adv, tf.float32))
    return tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1))


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class Trades(Method):
    """TRADES; `beta_trades` weighs robustness against accuracy (6 in the TRADES paper)."""

    terms = Method.terms + ("trades_kl",)

    def __init__(self, beta_trades=6.0, **kwargs):
        super().__init__(**kwargs)
        if beta_trades < 0:
            raise ValueError(f"beta_trades must be >= 0, got {beta_trades}.")
        self.beta_trades = float(beta_trades)

    def adversarial_examples(self, model, x, y, seed=None):
        clean = tf.stop_gradient(tf.nn.softmax(tf.cast(model.inference_logits(x), tf.float32)))
        attack = model.adversary.replace(random_start=0.001, restarts=1, loss_fn=kl_from_clean)
        return model.attack(x, clean, adversary=attack, seed=seed)

    def losses(self, model, views, y):
        terms = {
            "ce": mean_cross_entropy(y, views.logits),
            "ce_adv": mean_cross_entropy(y, views.logits_adv),
            "trades_kl": prediction_kl(views.logits, views.logits_adv),
        }
        if views.latents:
            terms["vulnerability"] = network_vulnerability(views.latents, views.latents_adv)
        terms["loss"] = (
            terms["ce"] + self.beta_trades * terms["trades_kl"] + self.weight_decay * model.kernel_l2()
        )
        return terms

    def get_config(self):
        return {**super().get_config(), "beta_trades": self.beta_trades}


register("trades", Trades, adversarial=True)
