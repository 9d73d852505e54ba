"""The cross-entropy every method trains on and every attack maximizes.

One function, with cleverhans' argument order (labels, logits), so that an attack's
`loss_fn` and a method's loss terms read alike. Computed in float32 whatever the
logits' dtype, so a mixed-precision model's loss is not rounded to float16.
"""

import tensorflow as tf


def cross_entropy(labels, logits):
    """Per-example cross-entropy of integer `labels` against `logits`, shape [batch]."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
    )
