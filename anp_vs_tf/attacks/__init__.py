"""Adversarial attacks: callables `attack(logits_fn, x, y, seed) -> x_adv`."""
from anp_vs_tf.attacks.apgd import APGD, dlr_loss, targeted_dlr_loss
from anp_vs_tf.attacks.autoattack import AutoAttack
from anp_vs_tf.attacks.fab import FAB
from anp_vs_tf.attacks.pgd import PGD, fgsm
from anp_vs_tf.attacks.square import Square
from anp_vs_tf.attacks.transfer import TransferAttack

__all__ = ["APGD", "AutoAttack", "FAB", "PGD", "Square", "TransferAttack", "dlr_loss", "fgsm", "targeted_dlr_loss"]
