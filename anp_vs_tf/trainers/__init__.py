"""Training: the `RobustModel` step and the methods it runs."""
from anp_vs_tf.trainers.methods import PRESETS, Method, Views, cross_entropy, get_method
from anp_vs_tf.trainers.robust_model import RobustModel

__all__ = ["PRESETS", "Method", "RobustModel", "Views", "cross_entropy", "get_method"]
