"""Batches for training and evaluation: the one shuffle and the one augmentation.

Training data is a pure function of (seed, step): epoch e is the permutation of the
examples drawn from the stateless seed (seed, e), cut into batches in that order, and
each example's crop and flip is drawn from (seed, e, example). Two views share it:

- `training_stream(..., start_step=s)`: the endless stream from batch s on, so a run
  restored from a checkpoint at step s trains on exactly the batches an uninterrupted
  run would (the CLI trains on it, with fit(steps_per_epoch=...)).
- `make_dataset(..., training=True)`: one epoch per pass, for fit(epochs=...) without
  steps_per_epoch; its k-th complete pass is epoch k, so fitting on it sees the same
  batches, in the same order, as fitting on the stream from step 0.

Evaluation batches keep the stored order and are never augmented. Images stay uint8
until the last map, which scales them to float32 in [0, 1] (models and attacks work in
pixel space).
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from anp_vs_tf.data.errors import DataError, check_int

PAD = 4  # pixels of zero padding before the random crop (standard CIFAR augmentation)
# Offsets the augmentation keys from the shuffle seed, so that an example's crop is not
# drawn from the same stream as the permutation.
AUGMENT_SEED_OFFSET = 1_000_003


class Examples(NamedTuple):
    """A split held as tensors once, for all the pipelines built on it."""

    images: tf.Tensor  # uint8 (N, H, W, C)
    labels: tf.Tensor  # int32 (N,)

    @property
    def count(self):
        return int(self.labels.shape[0])


def make_dataset(images, labels, batch_size, training, seed=0, augment=False, drop_remainder=False):
    """Batches of (float32 images in [0, 1] (B, H, W, C), int32 labels (B,)).

    training: one epoch of the seeded training order per pass, the k-th complete pass
    being epoch k of `training_stream(images, labels, batch_size, seed, augment)`; with
    `augment`, each image is randomly cropped from its 4-pixel zero-padded copy and
    flipped left-right. Without training, the order is kept and nothing is augmented.
    images must be uint8.
    """
    check_int(batch_size, "batch_size", 1)
    examples = as_examples(images, labels, "make_dataset")
    if training:
        return epoch_per_pass(examples, batch_size, seed, augment, drop_remainder)
    return in_order(examples, batch_size, drop_remainder)


def training_stream(images, labels, batch_size, seed=0, augment=False, start_step=0):
    """Endless training batches in which batch i is a pure function of (seed, i).

    Epoch e is the permutation of the examples drawn from the stateless seed (seed, e),
    cut into ceil(N / batch_size) batches (the last one shorter); augmentation is keyed
    by (seed, e, example). So `training_stream(..., start_step=s)` yields exactly the
    batches an uninterrupted stream yields from its s-th on: a run restored from a
    checkpoint at step s continues on the same data, in the same order. Use it with
    `fit(..., steps_per_epoch=steps_per_epoch(N, batch_size))`.
    """
    check_int(batch_size, "batch_size", 1)
    check_int(start_step, "start_step", 0)
    return stream(as_examples(images, labels, "training_stream"), batch_size, seed, augment,
                  start_step)


def steps_per_epoch(num_examples, batch_size, drop_remainder=False):
    """Batches in one pass over the data, the last one possibly shorter (unless dropped)."""
    if drop_remainder:
        return int(num_examples) // int(batch_size)
    return -(-int(num_examples) // int(batch_size))


def as_examples(images, labels, caller):
    """Checked uint8 images and their labels as Examples."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:  # float input would be divided by 255 a second time
        raise DataError(f"{caller} takes uint8 images (0..255), got {images.dtype}")
    if images.ndim != 4 or len(images) != len(labels):
        raise DataError(
            f"{caller} needs images (N, H, W, C) and labels (N,), got shapes "
            f"{images.shape} and {labels.shape}"
        )
    return Examples(tf.constant(images), tf.constant(labels.astype(np.int32)))


def in_order(examples, batch_size, drop_remainder=False):
    """Evaluation batches: the stored order, nothing augmented."""
    order = tf.data.Dataset.range(examples.count).batch(batch_size, drop_remainder=drop_remainder)
    return _batches(examples, order.map(lambda indices: (indices, tf.constant(0, tf.int64))), False)


def stream(examples, batch_size, seed, augment, start_step=0):
    """The endless training stream from global step `start_step` (see training_stream)."""
    first_epoch, offset = divmod(start_step, steps_per_epoch(examples.count, batch_size))
    epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
    order = epochs.flat_map(lambda epoch: _epoch_order(examples.count, batch_size, seed, epoch))
    return _batches(examples, order.skip(offset), augment, seed)  # skips indices, not images


def epoch_per_pass(examples, batch_size, seed, augment, drop_remainder=False):
    """One epoch of the training stream per pass: the k-th complete pass is epoch k.

    fit(epochs=E) without steps_per_epoch iterates its data once per epoch, so on this
    it trains on the stream's first E epochs. A pass counts as complete once its last
    batch has been handed over, so a pass given up early (Keras' look at the first
    batch under a distribution strategy, the spare iterator it opens at the end of each
    epoch, `next(iter(dataset))`) does not move on to the next epoch. The count is a
    Python int (tf.py_function): load() runs under the strategy's scope, which would
    mirror a tf.Variable across devices.
    """
    steps = steps_per_epoch(examples.count, batch_size, drop_remainder)
    passes = [0]  # complete passes so far

    def count_pass(index):
        if int(index) == steps - 1:
            passes[0] += 1
        return index

    def counted(index, batch):
        with tf.control_dependencies([tf.py_function(count_pass, [index], tf.int64)]):
            return tf.nest.map_structure(tf.identity, batch)

    def this_epoch(_):
        return tf.reshape(tf.py_function(lambda: np.int64(passes[0]), [], tf.int64), [])

    order = tf.data.Dataset.range(1).map(this_epoch).flat_map(
        lambda epoch: _epoch_order(examples.count, batch_size, seed, epoch, drop_remainder)
    )
    # Counted as batches leave the prefetch buffer, not as they are made ahead of time;
    # no prefetch may be added after the count.
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    batches = _batches(examples, order, augment, seed).enumerate().map(counted)
    return batches.with_options(options).apply(tf.data.experimental.assert_cardinality(steps))


def _epoch_order(count, batch_size, seed, epoch, drop_remainder=False):
    """Batches of (example indices, epoch) in the order of epoch `epoch`: the one shuffle."""
    noise = tf.random.stateless_uniform([count], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
    order = tf.data.Dataset.from_tensor_slices(tf.argsort(noise))
    return order.batch(batch_size, drop_remainder=drop_remainder).map(lambda indices: (indices, epoch))


def _batches(examples, order, augment, seed=0):
    """The (float32 images, int32 labels) batches of the index batches in `order`."""

    def gather(indices, epoch):
        images = tf.gather(examples.images, indices)
        if augment:
            # One key per (seed, epoch, example): the same example gets a new view each epoch.
            keys = epoch * examples.count + tf.cast(indices, tf.int64) + seed + AUGMENT_SEED_OFFSET
            images = tf.map_fn(lambda pair: _crop_and_flip(*pair), (images, keys),
                               fn_output_signature=images.dtype)
        return tf.cast(images, tf.float32) / 255.0, tf.gather(examples.labels, indices)

    return order.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _crop_and_flip(image, key):
    """Random crop of the zero-padded image + random left-right flip: the one augmentation."""
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([key, tf.constant(0, tf.int64)]), 2)
    )
    padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
    image = tf.image.stateless_random_crop(padded, image.shape, seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
