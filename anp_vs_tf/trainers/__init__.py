"""Training: the `RobustModel` step and the methods it runs.

Importing this package registers every method (see `methods.register`).
"""
from anp_vs_tf.trainers.methods import (
    REGISTRY,
    Method,
    Views,
    mean_cross_entropy,
    get_method,
    method_names,
    method_switches,
    register,
)
from anp_vs_tf.trainers.robust_model import RobustModel
from anp_vs_tf.trainers.loading import load_robust_model

# Methods beyond the base class's switches register themselves when imported.
from anp_vs_tf.trainers.admm import Admm
from anp_vs_tf.trainers.adv_bnn import AdvBnn
from anp_vs_tf.trainers.trades import Trades

__all__ = [
    "REGISTRY",
    "Admm",
    "AdvBnn",
    "Method",
    "RobustModel",
    "Trades",
    "Views",
    "mean_cross_entropy",
    "get_method",
    "load_robust_model",
    "method_names",
    "method_switches",
    "register",
]
