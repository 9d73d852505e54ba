"""Mixed precision: train in bfloat16, measure and serve in float32.

Keras' "mixed_bfloat16" policy keeps every variable in float32 and computes the layers
in bfloat16. On a CPU with AVX512-BF16 that makes a VGG-16 PGD step ~30% faster
(benchmarks/README.md). What a run reports and exports is computed in float32 again
(`float32_copy`): an attack whose gradients carry 8 bits of mantissa is a weaker
attack, and robust accuracy must not profit from that.

float16 is not supported: it needs loss scaling, which RobustModel's step (two
optimizers, one tape) does not do; bfloat16 has float32's range and needs none.
"""

import contextlib

import keras

from anp_vs_tf.layers import all_layers

MIXED_POLICY = "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(name):
    """Layers created inside the block get the dtype policy `name`; the global one is restored after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def compute_dtypes(model):
    """The set of compute dtypes of `model`'s layers (a RobustModel or a backbone)."""
    backbone = getattr(model, "backbone", model)
    return {layer.compute_dtype for layer in all_layers(backbone)}


def is_mixed(model):
    """True if any layer of `model` computes in another dtype than float32."""
    return compute_dtypes(model) != {"float32"}


def check_supported(model):
    """Raise ValueError, saying what to use instead, for a policy RobustModel cannot train with."""
    if "float16" in compute_dtypes(model):
        raise ValueError(
            "float16 layers need loss scaling, which RobustModel does not do; build the model "
            f"under the {MIXED_POLICY!r} policy instead (float32 range, no scaling needed)."
        )


def _as_float32(config):
    """`config` (a serialized Keras object) with every mixed dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and config["config"]["name"].startswith("mixed_"):
            return "float32"
        return {key: _as_float32(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_as_float32(value) for value in config]
    return config


def float32_copy(model):
    """`model` itself if it computes in float32, else a float32 copy with the same weights.

    The copy is built from the model's config with every dtype policy replaced, so it
    is the same network (masks, method, attack, seed); it is compiled without
    optimizers, for evaluation and export only.
    """
    if not is_mixed(model):
        return model
    config = _as_float32(keras.saving.serialize_keras_object(model))
    config.pop("compile_config", None)
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy
