"""Where each data set comes from, class-balanced subsets, and the tf.data pipelines.

`load()` is the entry point. Data is looked for, in order, in (1) `data_dir` (else
$ANP_VS_DATA_DIR) as IDX files or an image-folder tree, (2) system folders such as
the Debian package's Fashion-MNIST, (3) tensorflow-datasets. Arrays stay uint8 until
the pipeline, which scales them to float32 in [0, 1] (models and attacks work in
pixel space).
"""

import dataclasses
import os
from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf

from anp_vs_tf.data.errors import DataError
from anp_vs_tf.data.idx import find_idx_files, load_idx
from anp_vs_tf.data.image_folder import is_image_folder, load_image_folder

SPLITS = ("train", "test")
ON_BAD_FILE = ("skip", "error")
TFDS = "tensorflow-datasets"
PAD = 4  # pixels of zero padding before the random crop (standard CIFAR augmentation)
# Offsets the augmentation seed from the shuffle seed: the same op seed would give
# both the same random stream, tying each example's crop to its shuffled position.
AUGMENT_SEED_OFFSET = 1_000_003

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What is known about a data set before reading it (None: taken from the files)."""

    name: str
    input_shape: tuple | None
    num_classes: int | None
    class_names: tuple | None
    tfds_name: str | None = None  # None: not available from tensorflow-datasets
    system_dirs: tuple = ()  # folders where a system package installs it
    system_hint: str = ""  # how to get it into system_dirs
    augment: bool = False  # default of load(augment=None)


DATASETS = {
    "mnist": DatasetSpec(
        "mnist", (28, 28, 1), 10, tuple(str(i) for i in range(10)), tfds_name="mnist"
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", (28, 28, 1), 10, FASHION_MNIST_CLASSES, tfds_name="fashion_mnist",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        system_hint="install the Debian package dataset-fashion-mnist",
    ),
    "cifar10": DatasetSpec(
        "cifar10", (32, 32, 3), 10, CIFAR10_CLASSES, tfds_name="cifar10", augment=True
    ),
    "cifar100": DatasetSpec(
        "cifar100", (32, 32, 3), 100, CIFAR100_CLASSES, tfds_name="cifar100", augment=True
    ),
    # A user's own image-folder tree: data_dir/{train,test}/<class>/<images>.
    "folder": DatasetSpec("folder", None, None, None),
}


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

    train: tf.data.Dataset
    test: tf.data.Dataset
    validation: tf.data.Dataset | None
    info: DataInfo
    # train_from(step): the endless, resumable training stream from global step `step`
    # (see training_stream); `train` is the same data as one reshuffled pass per epoch.
    train_from: Callable[[int], tf.data.Dataset] | None = None


@dataclasses.dataclass(frozen=True)
class _Source:
    kind: str  # "idx", "image_folder" or "tfds"
    path: str | None  # the folder; for "tfds" the TFDS data_dir (None: TFDS default)
    looked_in: tuple = ()  # folders searched before falling back to TFDS


def load_arrays(name, split, data_dir=None, download=True, on_bad_file="skip"):
    """One split as numpy arrays: (images uint8 (N, H, W, C), labels int64 (N,), info dict).

    The info dict holds the DataInfo fields known from one split: name, input_shape,
    num_classes, class_names, source.
    """
    spec = _check_name(name)
    _check_choice(split, SPLITS, "split")
    _check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
    return _read(spec, _find_source(spec, data_dir), split, download, on_bad_file)


def class_balanced_subset(labels, n, num_classes):
    """Sorted indices of n examples: n // K per class (one more for the first n % K classes).

    Takes the earliest examples of each class, so a subset is deterministic and a
    larger subset contains a smaller one.
    """
    _check_int(n, "subset size", 0)
    labels = np.asarray(labels)
    if n > len(labels):
        raise DataError(f"cannot take {n} examples from a set of {len(labels)}; ask for fewer")
    quotas = _quotas(n, num_classes)
    picked = []
    for label, quota in enumerate(quotas):
        members = np.flatnonzero(labels == label)
        if len(members) < quota:
            raise DataError(
                f"a class-balanced subset of {n} needs {quota} examples of class {label}, "
                f"but there are only {len(members)}; ask for fewer"
            )
        picked.append(members[:quota])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def make_dataset(images, labels, batch_size, training, seed=0, augment=False, drop_remainder=False):
    """Batches of (float32 images in [0, 1] (B, H, W, C), int32 labels (B,)).

    training: shuffle the whole set with `seed`, reshuffled every epoch (the sequence
    of epochs is deterministic for a seed), and if `augment`, random-crop the 4-pixel
    zero-padded image and flip it left-right, also determined by `seed`. Without
    training, the order is kept and nothing is augmented. images must be uint8.
    """
    _check_int(batch_size, "batch_size", 1)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:  # float input would be divided by 255 a second time
        raise DataError(f"make_dataset takes uint8 images (0..255), got {images.dtype}")
    if images.ndim != 4 or len(images) != len(labels):
        raise DataError(
            f"make_dataset needs images (N, H, W, C) and labels (N,), got shapes "
            f"{images.shape} and {labels.shape}"
        )
    dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if training:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        if augment:
            # One random int64 per example, different each epoch, drives stateless ops.
            noise = tf.data.Dataset.random(
                seed=seed + AUGMENT_SEED_OFFSET, rerandomize_each_iteration=True
            )
            dataset = tf.data.Dataset.zip(dataset, noise).map(
                _crop_and_flip, num_parallel_calls=tf.data.AUTOTUNE
            )
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def training_stream(images, labels, batch_size, seed=0, augment=False, start_step=0):
    """Endless training batches in which batch i is a pure function of (seed, i).

    Epoch e is the permutation of the examples drawn from the stateless seed (seed, e),
    cut into ceil(N / batch_size) batches (the last one shorter); augmentation is keyed
    by (seed, e, example). So `training_stream(..., start_step=s)` yields exactly the
    batches an uninterrupted stream yields from its s-th on: a run restored from a
    checkpoint at step s continues on the same data, in the same order. Use it with
    `fit(..., steps_per_epoch=steps_per_epoch(N, batch_size))`.
    """
    _check_int(batch_size, "batch_size", 1)
    _check_int(start_step, "start_step", 0)
    images, labels = np.asarray(images), np.asarray(labels).astype(np.int32)
    if images.dtype != np.uint8:
        raise DataError(f"training_stream takes uint8 images (0..255), got {images.dtype}")
    count = len(labels)
    first_epoch, offset = divmod(start_step, steps_per_epoch(count, batch_size))
    all_images, all_labels = tf.constant(images), tf.constant(labels)

    def gather(indices, epoch):
        batch_images, batch_labels = tf.gather(all_images, indices), tf.gather(all_labels, indices)
        if augment:
            keys = epoch * count + tf.cast(indices, tf.int64) + seed + AUGMENT_SEED_OFFSET
            batch_images = tf.map_fn(
                lambda pair: _crop_and_flip((pair[0], 0), pair[1])[0], (batch_images, keys),
                fn_output_signature=batch_images.dtype,
            )
        return batch_images, batch_labels

    def one_epoch(epoch):
        noise = tf.random.stateless_uniform([count], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        order = tf.data.Dataset.from_tensor_slices(tf.argsort(noise)).batch(batch_size)
        return order.map(lambda indices: gather(indices, epoch))

    stream = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(one_epoch).skip(offset)
    return stream.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(num_examples, batch_size):
    """Batches in one pass over the data, the last one possibly shorter."""
    return -(-int(num_examples) // int(batch_size))


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
    """The named data set as Data(train, test, validation, info).

    batch_size batches the training set; eval_batch_size (default: batch_size) the test
    and validation sets, which need no gradients and run faster in larger batches.
    train_subset / test_subset: a class-balanced subset of that many examples (see
    class_balanced_subset). validation_examples: a class-balanced held-out set from the
    end of each class's training examples (never from the test set), so it cannot
    overlap a train subset. augment=None means crop + flip for CIFAR only.
    """
    spec = _check_name(name)
    _check_int(batch_size, "batch_size", 1)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    _check_int(eval_batch_size, "eval_batch_size", 1)
    for value, what in ((train_subset, "train_subset"), (test_subset, "test_subset")):
        if value is not None:
            _check_int(value, what, 1)
    _check_int(validation_examples, "validation_examples", 0)
    _check_int(seed, "seed", None)
    _check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
    if augment not in (None, True, False):
        raise DataError(f"augment must be None, True or False, got {augment!r}")
    augment = spec.augment if augment is None else augment

    source = _find_source(spec, data_dir)
    x_train, y_train, info = _read(spec, source, "train", download, on_bad_file)
    x_test, y_test, test_info = _read(spec, source, "test", download, on_bad_file)
    if test_info["input_shape"] != info["input_shape"]:
        raise DataError(
            f"{name} train images are {_shape(info['input_shape'])} but test images are "
            f"{_shape(test_info['input_shape'])} (in {info['source']}); make them match"
        )

    k = info["num_classes"]
    val_idx, train_idx = _split_validation(y_train, train_subset, validation_examples, k)
    test_idx = np.arange(len(y_test)) if test_subset is None else class_balanced_subset(
        y_test, test_subset, k
    )

    def pipeline(x, y, training):
        size = batch_size if training else eval_batch_size
        return make_dataset(x, y, size, training, seed=seed, augment=augment and training)

    def train_from(step=0):
        return training_stream(x_train[train_idx], y_train[train_idx], batch_size, seed=seed,
                               augment=augment, start_step=step)

    return Data(
        train_from=train_from,
        train=pipeline(x_train[train_idx], y_train[train_idx], True),
        test=pipeline(x_test[test_idx], y_test[test_idx], False),
        validation=pipeline(x_train[val_idx], y_train[val_idx], False) if len(val_idx) else None,
        info=DataInfo(
            num_train=len(train_idx), num_test=len(test_idx), num_validation=len(val_idx), **info
        ),
    )


# --- sources -------------------------------------------------------------------------


def _find_source(spec, data_dir):
    """The first place that has the data set; TFDS (checked when read) if no folder has it."""
    data_dir = None if data_dir is None else os.fspath(data_dir)
    if spec.name == "folder":
        if data_dir is None:
            raise DataError(
                "dataset 'folder' needs data_dir (--data_dir): the root of a tree "
                "<root>/train/<class>/<images> and <root>/test/<class>/<images>"
            )
        if not is_image_folder(data_dir):
            raise DataError(
                f"{data_dir} is not an image-folder tree: expected "
                f"{os.path.join(data_dir, 'train')}/<class>/<images> and "
                f"{os.path.join(data_dir, 'test')}/<class>/<images>"
            )
        return _Source("image_folder", os.path.abspath(data_dir))

    root = data_dir if data_dir is not None else os.environ.get("ANP_VS_DATA_DIR") or None
    looked_in = []
    if root is not None:
        names = (spec.name, spec.name.replace("_", "-"), f"{spec.name}-jpeg", f"{spec.name}-idx")
        looked_in += dict.fromkeys([os.path.join(root, n) for n in names] + [root])
    looked_in += spec.system_dirs
    for folder in looked_in:
        if not os.path.isdir(folder):
            continue
        if find_idx_files(folder):
            return _Source("idx", os.path.abspath(folder))
        if is_image_folder(folder):
            return _Source("image_folder", os.path.abspath(folder))
    # TFDS keeps its own store (TFDS_DATA_DIR or ~/tensorflow_datasets): a download
    # must not land in the user's data folder, which may be read-only or shared.
    return _Source("tfds", None, tuple(looked_in))


def _read(spec, source, split, download, on_bad_file):
    """One split from `source`, checked against the spec: (images, labels, info dict)."""
    if source.kind == "idx":
        images, labels = load_idx(*find_idx_files(source.path)[split])
        class_names = spec.class_names
    elif source.kind == "image_folder":
        images, labels, class_names = load_image_folder(source.path, split, on_bad_file)
        if spec.num_classes is not None and len(class_names) != spec.num_classes:
            raise DataError(
                f"{source.path} has {len(class_names)} class folders but {spec.name} has "
                f"{spec.num_classes} classes; point data_dir at the right tree"
            )
    else:
        images, labels = _read_tfds(spec, source, split, download)
        class_names = spec.class_names
    where = source.path if source.kind != "tfds" else TFDS

    input_shape = tuple(int(d) for d in images.shape[1:])
    if spec.input_shape is not None and input_shape != spec.input_shape:
        raise DataError(
            f"{spec.name} images are {_shape(spec.input_shape)} but those in {where} are "
            f"{_shape(input_shape)}; convert them or load them as dataset 'folder'"
        )
    num_classes = len(class_names)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(
            f"the {split} labels in {where} include {bad}, outside [0, {num_classes}) for "
            f"{spec.name}; the label file is corrupt or belongs to another data set"
        )
    info = dict(
        name=spec.name, input_shape=input_shape, num_classes=num_classes,
        class_names=tuple(class_names), source=where,
    )
    return images, labels.astype(np.int64), info


def _read_tfds(spec, source, split, download):
    """One split via tensorflow-datasets; any failure there is "not found" with advice."""
    try:
        import tensorflow_datasets as tfds

        images, labels = tfds.as_numpy(
            tfds.load(
                spec.tfds_name, split=split, as_supervised=True, batch_size=-1,
                download=download, data_dir=source.path,
            )
        )
    except Exception as e:  # TFDS raises many types (AssertionError, OSError, ...)
        raise DataError(_not_found(spec, source, download, e)) from e
    return np.asarray(images, np.uint8), np.asarray(labels, np.int64)


def _not_found(spec, source, download, error):
    """The one-line "nothing found" message: where we looked and how to provide the data."""
    looked = ", ".join(source.looked_in) if source.looked_in else (
        "no folder, as no data_dir was given and ANP_VS_DATA_DIR is not set"
    )
    if source.path is not None and not os.path.isdir(source.path):
        looked += f" ({source.path} does not exist)"
    # TFDS messages run over several sentences and lines; the first sentence says it.
    tfds_error = (str(error).strip().splitlines() or [type(error).__name__])[0]
    tfds_error = tfds_error.split(". ")[0][:300]
    ways = [
        "pass --data_dir or set ANP_VS_DATA_DIR to a folder holding the 4 IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte, plain or .gz) or an image-folder tree train/<class>/*, "
        "test/<class>/*",
    ]
    if spec.system_hint:
        ways.append(spec.system_hint)
    if download:
        ways.append("fix what stopped tensorflow-datasets (downloading needs internet)")
    else:
        ways.append("let tensorflow-datasets download it (download=True, needs internet)")
    return (
        f"no {spec.name} data found (looked in {looked}; tensorflow-datasets: {tfds_error}); "
        f"to provide it, {'; or '.join(ways)}"
    )


# --- subsets ---------------------------------------------------------------------------


def _quotas(n, num_classes):
    """Examples per class in a balanced set of n: the first n % K classes get one more."""
    return [n // num_classes + (label < n % num_classes) for label in range(num_classes)]


def _split_validation(labels, train_subset, validation_examples, num_classes):
    """(validation indices, train indices): validation from the end of each class."""
    if validation_examples == 0:
        train = np.arange(len(labels)) if train_subset is None else class_balanced_subset(
            labels, train_subset, num_classes
        )
        return np.zeros(0, np.int64), train

    if train_subset is None and validation_examples >= len(labels):
        raise DataError(
            f"validation_examples={validation_examples} leaves none of the {len(labels)} "
            "training examples to train on; ask for fewer"
        )
    counts = np.bincount(labels, minlength=num_classes)
    need = np.add(
        _quotas(validation_examples, num_classes), _quotas(train_subset or 0, num_classes)
    )
    short = np.flatnonzero(need > counts)
    if short.size:
        c = int(short[0])
        raise DataError(
            f"validation_examples={validation_examples} with train_subset={train_subset} needs "
            f"{need[c]} training examples of class {c} but there are {counts[c]}; ask for fewer"
        )
    # The last examples of each class are the first ones of the reversed array.
    reversed_idx = class_balanced_subset(labels[::-1], validation_examples, num_classes)
    validation = np.sort(len(labels) - 1 - reversed_idx)
    rest = np.setdiff1d(np.arange(len(labels)), validation)
    if train_subset is None:
        return validation, rest
    return validation, rest[class_balanced_subset(labels[rest], train_subset, num_classes)]


# --- pipeline ops ----------------------------------------------------------------------


def _crop_and_flip(example, noise):
    """Random crop of the zero-padded image + random left-right flip, seeded by `noise`."""
    image, label = example
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([noise, tf.constant(0, tf.int64)]), 2)
    )
    padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
    image = tf.image.stateless_random_crop(padded, image.shape, seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed), label


def _to_float(images, labels):
    return tf.cast(images, tf.float32) / 255.0, labels


# --- argument checks -------------------------------------------------------------------


def _check_name(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _check_choice(value, choices, what):
    if value not in choices:
        raise DataError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def _check_int(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise DataError(f"{what} must be at least {minimum}, got {value}")


def _shape(shape):
    return "x".join(map(str, shape))
