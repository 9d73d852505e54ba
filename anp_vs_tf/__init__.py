"""anp_vs_tf: Adversarial Neural Pruning with Vulnerability Suppression for Keras 3.

Importing the package is cheap: its subpackages (and TensorFlow with them) load when
first used, `anp_vs_tf.trainers` or `from anp_vs_tf import models` (PEP 562, as Keras
and TensorFlow Probability load theirs), so `python -m anp_vs_tf.report` reads its
JSON without starting TensorFlow. Importing `anp_vs_tf.trainers` registers every Keras
object the package saves; `anp_vs_tf.load_model(path)` does that and loads a model.
"""

import importlib

from anp_vs_tf.version import __version__

_SUBMODULES = (
    "analysis", "attacks", "building", "checkpointing", "config", "data", "distribute", "errors",
    "evaluation", "experiment", "export", "files", "kernels", "layers", "losses", "metrics", "models",
    "plots", "precision", "report", "run_dir", "seeds", "trainers", "tuning",
)

__all__ = ["__version__", "load_model", *_SUBMODULES]


def load_model(path):
    """A model saved by this package (`trainers.load_robust_model`): registers the package's
    Keras objects first, which `keras.saving.load_model` needs."""
    return importlib.import_module("anp_vs_tf.trainers").load_robust_model(path)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"anp_vs_tf.{name}")
    raise AttributeError(f"module 'anp_vs_tf' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
