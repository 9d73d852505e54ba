"""load(): from a data set's name to its ready train, test and validation pipelines.

It checks every argument before any data is read, then joins the other modules: the
files come from `sources`, the subsets and validation split from `subsets`, and the
batches from `pipeline`, so that one call gives everything a run trains and tests on.
"""

import dataclasses
from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf

from anp_vs_tf.data import pipeline, sources
from anp_vs_tf.data.errors import DataError, check_choice, check_int, shape_text
from anp_vs_tf.data.subsets import class_balanced_subset, split_validation


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """Facts about a loaded data set, for building models and reporting results."""

    name: str
    input_shape: tuple  # (H, W, C)
    num_classes: int
    class_names: tuple
    num_train: int
    num_test: int
    num_validation: int
    source: str  # where the data came from: a folder, or "tensorflow-datasets"


class Data(NamedTuple):
    """What load() returns: batched pipelines of (float32 images in [0, 1], int32 labels)."""

    # One epoch per pass, for fit(epochs=...): the k-th complete pass over it is epoch k
    # of train_from(0), so fitting on it trains on the same batches in the same order.
    train: tf.data.Dataset
    test: tf.data.Dataset
    validation: tf.data.Dataset | None
    info: DataInfo
    # train_from(step): the endless, resumable training stream from global step `step`
    # (see pipeline.training_stream), for fit(steps_per_epoch=...).
    train_from: Callable[[int], tf.data.Dataset] | None = None


def load(
    name,
    data_dir=None,
    batch_size=128,
    train_subset=None,
    test_subset=None,
    validation_examples=0,
    seed=0,
    augment=None,
    download=True,
    on_bad_file="skip",
    eval_batch_size=None,
):
    """The named data set as Data(train, test, validation, info, train_from).

    batch_size batches the training set; eval_batch_size (default: batch_size) the test
    and validation sets, which need no gradients and run faster in larger batches.
    train_subset / test_subset: a class-balanced subset of that many examples (see
    class_balanced_subset). validation_examples: a class-balanced held-out set from the
    end of each class's training examples (never from the test set), so it cannot
    overlap a train subset. augment=None means crop + flip for CIFAR only.
    """
    spec = sources.check_name(name)
    check_int(batch_size, "batch_size", 1)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    check_int(eval_batch_size, "eval_batch_size", 1)
    for value, what in ((train_subset, "train_subset"), (test_subset, "test_subset")):
        if value is not None:
            check_int(value, what, 1)
    check_int(validation_examples, "validation_examples", 0)
    check_int(seed, "seed", None)
    check_choice(on_bad_file, sources.ON_BAD_FILE, "on_bad_file")
    if augment not in (None, True, False):
        raise DataError(f"augment must be None, True or False, got {augment!r}")
    augment = spec.augment if augment is None else augment

    source = sources.find_source(spec, data_dir)
    x_train, y_train, info = sources.read(spec, source, "train", download, on_bad_file)
    x_test, y_test, test_info = sources.read(spec, source, "test", download, on_bad_file)
    if test_info["input_shape"] != info["input_shape"]:
        raise DataError(
            f"{name} train images are {shape_text(info['input_shape'])} but test images are "
            f"{shape_text(test_info['input_shape'])} (in {info['source']}); make them match"
        )

    k = info["num_classes"]
    val_idx, train_idx = split_validation(y_train, train_subset, validation_examples, k)
    test_idx = np.arange(len(y_test)) if test_subset is None else class_balanced_subset(
        y_test, test_subset, k
    )

    def examples(x, y, indices):
        return pipeline.as_examples(x[indices], y[indices], "load")

    train = examples(x_train, y_train, train_idx)  # one copy for both training views

    def train_from(step=0):
        check_int(step, "step", 0)
        return pipeline.stream(train, batch_size, seed, augment, start_step=step)

    return Data(
        train=pipeline.epoch_per_pass(train, batch_size, seed, augment),
        test=pipeline.in_order(examples(x_test, y_test, test_idx), eval_batch_size),
        validation=(
            pipeline.in_order(examples(x_train, y_train, val_idx), eval_batch_size)
            if len(val_idx) else None
        ),
        train_from=train_from,
        info=DataInfo(
            num_train=len(train_idx), num_test=len(test_idx), num_validation=len(val_idx), **info
        ),
    )
