"""Names of layers that earlier versions saved, read back as the plain Keras layers they equal.

Up to 1692e51 the zoo built CPU-tuned subclasses (`InputConv2D`, `SameConv2D`, its old
name `SmallMapConv2D`, `FusedBatchNormalization`) that computed exactly what their
Keras base class computes, only with other kernels. Their rewrites are now chosen when
a step is traced (`anp_vs_tf.kernels`), so a model file names only Keras layers and the
method's own. A file saved with the old names still loads: each name deserializes into
a class of that name with nothing of its own (Keras finds a layer's weights in the file
under its class name), and once its weights are read the layer becomes the plain
`keras.layers.Conv2D` or `BatchNormalization` it always equalled, so the loaded model
computes, and saves again, as plain Keras.
"""

import keras


def _reads_as(base, name):
    def load_own_variables(self, store):
        base.load_own_variables(self, store)
        self.__class__ = base  # the subclass adds no state or behaviour

    legacy = type(name, (base,), {
        "__doc__": f"{name} of files saved by earlier versions: loads as a plain keras.layers.{base.__name__}.",
        "__module__": __name__,
        "load_own_variables": load_own_variables,
    })
    return keras.saving.register_keras_serializable(package="anp_vs_tf", name=name)(legacy)


InputConv2D = _reads_as(keras.layers.Conv2D, "InputConv2D")
SameConv2D = _reads_as(keras.layers.Conv2D, "SameConv2D")
SmallMapConv2D = _reads_as(keras.layers.Conv2D, "SmallMapConv2D")
FusedBatchNormalization = _reads_as(keras.layers.BatchNormalization, "FusedBatchNormalization")
