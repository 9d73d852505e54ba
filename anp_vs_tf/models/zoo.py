"""The architectures of the paper, as functional Keras models with their latent features.

A backbone maps images to `{"logits": ..., "latents": [z_1, ..., z_L]}`, where z_l is
the post-activation output of hidden layer l. With `prunable=True` a
`BetaBernoulliDropout` follows every hidden activation and z_l is its (masked)
output, so a pruned unit is a feature with zero vulnerability. LeNet-5-Caffe also
masks the 800 flattened features that feed its dense layer, as the authors' network
does: 20 + 50 + 800 + 500 = 1370 prunable units, and pruning one of the 800 removes a
row of the largest kernel (800 x 500 of the 431k weights). With `bayesian=True`
the convolutions and dense layers have mean-field Gaussian weights (AT BNN).

The residual networks (ResNet-20, pre-activation ResNet-18) are written plainly and
made prunable by `models.make_prunable`, the function a user's own model goes through:
one mask per channel group, the residual channels a stage's Adds tie together
included (groups="all") or not ("inner").

Layer names are the same with and without the masks ("conv1", "dense1", "logits",
...), which is what lets a pruning run start from a pretrained base model.

The layers are Keras' own plus the method's (masks, Gaussian weights): what a user
would write. Faster kernels for a device are chosen when a step is traced
(`anp_vs_tf.kernels`), never built into the model.
"""

import keras

from anp_vs_tf.layers import BetaBernoulliDropout, GaussianConv2D, GaussianDense
from anp_vs_tf.models.prunable import make_prunable, with_latents

# CIFAR-10 per-channel statistics; VGG standardizes inside the model so that
# attacks and data stay in [0, 1] pixel space.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _Hidden:
    """Collects latent features and inserts the Beta-Bernoulli masks."""

    def __init__(self, prunable, mask_kwargs):
        self.prunable = prunable
        self.mask_kwargs = dict(mask_kwargs or {})
        self.latents = []

    def __call__(self, x, name):
        x = self.mask(x, name)
        self.latents.append(x)
        return x

    def mask(self, x, name):
        """x, masked when prunable; not a latent feature (e.g. a flattened feature map)."""
        if self.prunable:
            x = BetaBernoulliDropout(name=f"{name}_bbd", **self.mask_kwargs)(x)
        return x

    def outputs(self, logits):
        return {"logits": logits, "latents": self.latents}


class _Weights:
    """Builds conv and dense layers, deterministic or with Gaussian weights (AT BNN)."""

    def __init__(self, bayesian_kwargs):
        self.bayesian = bayesian_kwargs is not None
        self.bayesian_kwargs = dict(bayesian_kwargs or {})

    def conv(self, filters, kernel_size, name, padding="valid", activation=None, use_bias=True,
             kernel_initializer="glorot_uniform", strides=1):
        if self.bayesian:
            return GaussianConv2D(filters, kernel_size, strides=strides, padding=padding, activation=activation,
                                  use_bias=use_bias, name=name, **self.bayesian_kwargs)
        return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, activation=activation,
                                   use_bias=use_bias, kernel_initializer=kernel_initializer, name=name)

    def dense(self, units, name, activation=None, use_bias=True, kernel_initializer="glorot_uniform"):
        if self.bayesian:
            return GaussianDense(units, activation=activation, use_bias=use_bias, name=name,
                                 **self.bayesian_kwargs)
        return keras.layers.Dense(units, activation=activation, use_bias=use_bias,
                                  kernel_initializer=kernel_initializer, name=name)


def lenet_300_100(input_shape=(28, 28, 1), num_classes=10, prunable=False, mask_kwargs=None,
                  bayesian_kwargs=None):
    """The fully connected LeNet-300-100 (two hidden layers of 300 and 100 ReLUs)."""
    hidden, make = _Hidden(prunable, mask_kwargs), _Weights(bayesian_kwargs)
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = hidden(make.dense(300, "dense1", activation="relu")(x), "dense1")
    x = hidden(make.dense(100, "dense2", activation="relu")(x), "dense2")
    logits = make.dense(num_classes, "logits")(x)
    return keras.Model(inputs, hidden.outputs(logits), name="lenet_300_100")


def lenet5_caffe(input_shape=(28, 28, 1), num_classes=10, prunable=False, mask_kwargs=None,
                 bayesian_kwargs=None):
    """LeNet-5-Caffe: conv 20@5x5, max-pool, conv 50@5x5, max-pool, dense 500, dense classes.

    Prunable: masks on conv1, conv2, the 800 flattened features and dense1.
    """
    hidden, make = _Hidden(prunable, mask_kwargs), _Weights(bayesian_kwargs)
    inputs = keras.Input(input_shape, name="image")
    x = hidden(make.conv(20, 5, "conv1", activation="relu")(inputs), "conv1")
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = hidden(make.conv(50, 5, "conv2", activation="relu")(x), "conv2")
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = hidden.mask(keras.layers.Flatten(name="flatten")(x), "flatten")
    x = hidden(make.dense(500, "dense1", activation="relu")(x), "dense1")
    logits = make.dense(num_classes, "logits")(x)
    return keras.Model(inputs, hidden.outputs(logits), name="lenet5_caffe")


VGG16_CONV = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(input_shape=(32, 32, 3), num_classes=10, prunable=False, mask_kwargs=None,
          bayesian_kwargs=None, synchronized_bn=False):
    """VGG-16 for CIFAR: 13 conv-BN-ReLU blocks, two dense-BN-ReLU 512 layers, the classifier.

    synchronized_bn: batch statistics over the global batch of all replicas under a
    distribution strategy (Keras' `BatchNormalization(synchronized=True)`).
    """
    hidden, make = _Hidden(prunable, mask_kwargs), _Weights(bayesian_kwargs)
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Normalization(
        mean=CIFAR_MEAN, variance=[s * s for s in CIFAR_STD], name="standardize"
    )(inputs)
    conv, pool = 0, 0
    for width in VGG16_CONV:
        if width == "M":
            pool += 1
            x = keras.layers.MaxPooling2D(2, name=f"pool{pool}")(x)
            continue
        conv += 1
        x = make.conv(width, 3, f"conv{conv}", padding="same", use_bias=False,
                      kernel_initializer="he_normal")(x)
        x = keras.layers.BatchNormalization(name=f"bn{conv}", synchronized=synchronized_bn)(x)
        x = hidden(keras.layers.ReLU(name=f"relu{conv}")(x), f"conv{conv}")
    x = keras.layers.Flatten(name="flatten")(x)
    for i in (1, 2):
        x = make.dense(512, f"dense{i}", use_bias=False, kernel_initializer="he_normal")(x)
        x = keras.layers.BatchNormalization(name=f"dense{i}_bn", synchronized=synchronized_bn)(x)
        x = hidden(keras.layers.ReLU(name=f"dense{i}_relu")(x), f"dense{i}")
    logits = make.dense(num_classes, "logits")(x)
    return keras.Model(inputs, hidden.outputs(logits), name="vgg16")


def _standardize(inputs):
    return keras.layers.Normalization(mean=CIFAR_MEAN, variance=[s * s for s in CIFAR_STD],
                                      name="standardize")(inputs)


def _conv_bn(make, x, filters, kernel_size, strides, name, synchronized_bn):
    x = make.conv(filters, kernel_size, name, padding="same", strides=strides, use_bias=False,
                  kernel_initializer="he_normal")(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn", synchronized=synchronized_bn)(x)


def _residual(builder, prunable, groups, mask_kwargs):
    """The residual network `builder()` with its latents, or, prunable, its `make_prunable` copy."""
    model = builder()
    if not prunable:
        return with_latents(model, groups)
    return make_prunable(model, groups=groups, mask_kwargs=mask_kwargs)


def resnet20(input_shape=(32, 32, 3), num_classes=10, prunable=False, mask_kwargs=None, bayesian_kwargs=None,
             synchronized_bn=False, groups="all", width=16):
    """ResNet-20 for CIFAR (He et al. 2016, section 4.2): a 3x3 conv, three stages of three
    post-activation basic blocks of `width`, 2 and 4 x `width` channels, global pooling,
    the classifier; a 1x1 conv + BN shortcut where a stage halves the map (option B).
    0.27M weights, ~41M multiply-adds per image: the CPU-sized residual net.

    Prunable: one mask per channel group (`models.make_prunable`): the inner channel
    of each block and, with groups="all", each stage's residual channels.
    """
    make = _Weights(bayesian_kwargs)

    def build():
        inputs = keras.Input(input_shape, name="image")
        x = keras.layers.ReLU(name="stem_relu")(
            _conv_bn(make, _standardize(inputs), width, 3, 1, "stem", synchronized_bn))
        for stage, filters in enumerate((width, 2 * width, 4 * width), start=1):
            for block in range(1, 4):
                name, strides = f"s{stage}b{block}", 2 if stage > 1 and block == 1 else 1
                h = keras.layers.ReLU(name=f"{name}_relu1")(
                    _conv_bn(make, x, filters, 3, strides, f"{name}_conv1", synchronized_bn))
                h = _conv_bn(make, h, filters, 3, 1, f"{name}_conv2", synchronized_bn)
                shortcut = x if strides == 1 else _conv_bn(make, x, filters, 1, strides, f"{name}_shortcut",
                                                           synchronized_bn)
                x = keras.layers.ReLU(name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")([h, shortcut]))
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        return keras.Model(inputs, make.dense(num_classes, "logits")(x), name="resnet20")

    return _residual(build, prunable, groups, mask_kwargs)


def preact_resnet18(input_shape=(32, 32, 3), num_classes=10, prunable=False, mask_kwargs=None,
                    bayesian_kwargs=None, synchronized_bn=False, groups="all"):
    """Pre-activation ResNet-18 for CIFAR (He et al. 2016b), the robust-pruning benchmarks'
    network: a 3x3 conv of 64, four stages of two blocks (BN, ReLU, conv) of 64, 128,
    256 and 512 channels, a 1x1 conv shortcut where the shape changes, BN, ReLU, global
    pooling, the classifier. 11.2M weights, ~0.56G multiply-adds per image.

    Prunable: as `resnet20`.
    """
    make = _Weights(bayesian_kwargs)

    def bn_relu(x, name):
        x = keras.layers.BatchNormalization(name=f"{name}_bn", synchronized=synchronized_bn)(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x)

    def conv(x, filters, kernel_size, strides, name):
        return make.conv(filters, kernel_size, name, padding="same", strides=strides, use_bias=False,
                         kernel_initializer="he_normal")(x)

    def build():
        inputs = keras.Input(input_shape, name="image")
        x = conv(_standardize(inputs), 64, 3, 1, "stem")
        for stage, filters in enumerate((64, 128, 256, 512), start=1):
            for block in range(1, 3):
                name, strides = f"s{stage}b{block}", 2 if stage > 1 and block == 1 else 1
                out = bn_relu(x, f"{name}_pre")
                shortcut = x if strides == 1 and x.shape[-1] == filters else conv(
                    out, filters, 1, strides, f"{name}_shortcut")
                h = conv(out, filters, 3, strides, f"{name}_conv1")
                h = conv(bn_relu(h, f"{name}_mid"), filters, 3, 1, f"{name}_conv2")
                x = keras.layers.Add(name=f"{name}_add")([h, shortcut])
        x = keras.layers.GlobalAveragePooling2D(name="pool")(bn_relu(x, "final"))
        return keras.Model(inputs, make.dense(num_classes, "logits")(x), name="preact_resnet18")

    return _residual(build, prunable, groups, mask_kwargs)


# The residual networks: made prunable by channel groups (`groups="all"` or "inner").
RESIDUAL = ("resnet20", "preact_resnet18")

# name -> (builder, the input shape the architecture is defined for)
MODELS = {
    "lenet_300_100": (lenet_300_100, (28, 28, 1)),
    "lenet5_caffe": (lenet5_caffe, (28, 28, 1)),
    "vgg16": (vgg16, (32, 32, 3)),
    "resnet20": (resnet20, (32, 32, 3)),
    "preact_resnet18": (preact_resnet18, (32, 32, 3)),
}


def check_input_shape(name, input_shape):
    """Raise ValueError with a one-line reason if `name` cannot take `input_shape` images."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}.")
    expected = MODELS[name][1]
    if tuple(input_shape) != expected:
        fits = [m for m, (_, shape) in sorted(MODELS.items()) if shape == tuple(input_shape)]
        hint = f" Models for this shape: {', '.join(fits)}." if fits else ""
        raise ValueError(
            f"model {name} expects {'x'.join(map(str, expected))} images, "
            f"the data has {'x'.join(map(str, input_shape))}.{hint}"
        )


def build_model(name, input_shape=None, num_classes=10, prunable=False, mask_kwargs=None,
                bayesian_kwargs=None, **architecture_kwargs):
    """Build architecture `name` (see MODELS) for `input_shape` images and `num_classes`.

    prunable: add a BetaBernoulliDropout after every hidden layer (mask_kwargs go to it).
    bayesian_kwargs: if given (even {}), Gaussian weights with these settings (AT BNN).
    architecture_kwargs: the builder's own options, e.g. `synchronized_bn=True` for vgg16.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}.")
    builder, default_shape = MODELS[name]
    input_shape = tuple(input_shape or default_shape)
    check_input_shape(name, input_shape)
    return builder(input_shape, num_classes, prunable=prunable, mask_kwargs=mask_kwargs,
                   bayesian_kwargs=bayesian_kwargs, **architecture_kwargs)
