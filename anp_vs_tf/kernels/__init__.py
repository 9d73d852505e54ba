"""Faster kernels for some devices, as functions, and the choice of where they run.

The models stay plain Keras; `choose()` (see `kernels.choice`) picks, when a step is
traced, which of these rewrites it uses: `few_channel_conv` (the image's convolution,
and with its ReLU and max-pool), `same_conv` ('same' convolutions), and PGD's chunks.
"""
from anp_vs_tf.kernels.choice import (
    MEASURED,
    PLAIN,
    SETTINGS,
    KernelChoice,
    active_setting,
    choose,
    cpu_family,
    in_xla,
    use,
)

__all__ = ["MEASURED", "PLAIN", "SETTINGS", "KernelChoice", "active_setting", "choose", "cpu_family",
           "in_xla", "use"]
