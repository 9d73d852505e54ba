"""The data sets this package knows, and where their files are found and read from.

A data set is looked for, in order, in (1) `data_dir` (else $ANP_VS_DATA_DIR) as IDX
files or an image-folder tree, (2) system folders such as the Debian package's
Fashion-MNIST, (3) tensorflow-datasets. Whatever the source, a split comes back as the
same checked uint8 arrays, so nothing downstream knows where the data came from; when
nothing is found, the one-line error says where we looked and how to provide it.
"""

import dataclasses
import os

import numpy as np

from anp_vs_tf.data.errors import DataError, check_choice, shape_text
from anp_vs_tf.data.idx import find_idx_files, load_idx
from anp_vs_tf.data.image_folder import is_image_folder, load_image_folder

SPLITS = ("train", "test")
ON_BAD_FILE = ("skip", "error")
TFDS = "tensorflow-datasets"

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
class Source:
    """Where a data set was found."""

    kind: str  # "idx", "image_folder" or "tfds"
    path: str | None  # the folder; for "tfds" the TFDS data_dir (None: TFDS default)
    looked_in: tuple = ()  # folders searched before falling back to TFDS


def load_arrays(name, split, data_dir=None, download=True, on_bad_file="skip"):
    """One split as numpy arrays: (images uint8 (N, H, W, C), labels int64 (N,), info dict).

    The info dict holds the DataInfo fields known from one split: name, input_shape,
    num_classes, class_names, source.
    """
    spec = check_name(name)
    check_choice(split, SPLITS, "split")
    check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
    return read(spec, find_source(spec, data_dir), split, download, on_bad_file)


def check_name(name):
    """The DatasetSpec called `name`."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def find_source(spec, data_dir):
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
        return Source("image_folder", os.path.abspath(data_dir))

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
            return Source("idx", os.path.abspath(folder))
        if is_image_folder(folder):
            return Source("image_folder", os.path.abspath(folder))
    # TFDS keeps its own store (TFDS_DATA_DIR or ~/tensorflow_datasets): a download
    # must not land in the user's data folder, which may be read-only or shared.
    return Source("tfds", None, tuple(looked_in))


def read(spec, source, split, download, on_bad_file):
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
            f"{spec.name} images are {shape_text(spec.input_shape)} but those in {where} are "
            f"{shape_text(input_shape)}; convert them or load them as dataset 'folder'"
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
