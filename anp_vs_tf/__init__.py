"""anp_vs_tf: Adversarial Neural Pruning with Vulnerability Suppression for Keras 3.

Importing the package registers its Keras objects (layers, attacks, methods, the
RobustModel), so `keras.saving.load_model` can read the models it saves.
"""

from anp_vs_tf import attacks, layers, models, trainers
from anp_vs_tf.version import __version__

__all__ = ["__version__", "attacks", "layers", "models", "trainers"]
