"""Adversarial attacks: callables `attack(logits_fn, x, y, seed) -> x_adv`."""
from anp_vs_tf.attacks.pgd import PGD, cross_entropy_loss, fgsm
from anp_vs_tf.attacks.transfer import TransferAttack

__all__ = ["PGD", "TransferAttack", "cross_entropy_loss", "fgsm"]
