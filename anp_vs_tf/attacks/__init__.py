"""Adversarial attacks: callables `attack(logits_fn, x, y, seed) -> x_adv`."""
from anp_vs_tf.attacks.pgd import PGD, fgsm
from anp_vs_tf.attacks.transfer import TransferAttack

__all__ = ["PGD", "TransferAttack", "fgsm"]
