"""Backbones: the paper's architectures and the contract a user's own model follows."""
from anp_vs_tf.models.backbone import split_outputs, transfer_weights
from anp_vs_tf.models.zoo import (
    MODELS,
    build_model,
    check_input_shape,
    lenet5_caffe,
    lenet_300_100,
    vgg16,
)

__all__ = [
    "MODELS",
    "build_model",
    "check_input_shape",
    "lenet5_caffe",
    "lenet_300_100",
    "split_outputs",
    "transfer_weights",
    "vgg16",
]
