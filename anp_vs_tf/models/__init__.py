"""Backbones: the paper's architectures and the contract a user's own model follows."""
from anp_vs_tf.models.backbone import split_outputs, transfer_weights
from anp_vs_tf.models.prunable import channel_groups, make_prunable, prunable_groups
from anp_vs_tf.models.zoo import (
    MODELS,
    build_model,
    check_input_shape,
    lenet5_caffe,
    lenet_300_100,
    preact_resnet18,
    resnet20,
    vgg16,
)

__all__ = [
    "MODELS",
    "build_model",
    "channel_groups",
    "check_input_shape",
    "lenet5_caffe",
    "lenet_300_100",
    "make_prunable",
    "preact_resnet18",
    "prunable_groups",
    "resnet20",
    "split_outputs",
    "transfer_weights",
    "vgg16",
]
