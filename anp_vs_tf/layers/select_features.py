"""`SelectFeatures`: keeps given entries of the last axis, what a compact model needs where a
mask pruned single (channel, position) features of a flattened feature map."""

import keras


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class SelectFeatures(keras.layers.Layer):
    """Keeps the features `indices` (in that order) of the last axis and drops the rest."""

    def __init__(self, indices, **kwargs):
        super().__init__(**kwargs)
        self.indices = [int(i) for i in indices]
        if not self.indices or min(self.indices) < 0:
            raise ValueError(f"indices must be a non-empty list of non-negative ints, got {indices!r}.")

    def build(self, input_shape):
        if input_shape[-1] is not None and max(self.indices) >= input_shape[-1]:
            raise ValueError(
                f"{self.name}: index {max(self.indices)} is out of range for {input_shape[-1]} features."
            )

    def call(self, inputs):
        return keras.ops.take(inputs, self.indices, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (len(self.indices),)

    def get_config(self):
        return {**super().get_config(), "indices": self.indices}
