"""anp_vs_tf.data on the real offline data (MNIST IDX, CIFAR-10 JPEG tree, Fashion-MNIST)."""
import gzip
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import data
from anp_vs_tf.data import DataError, image_folder
from anp_vs_tf.data.idx import IMAGES_MAGIC, LABELS_MAGIC

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Keeps image-folder caches out of the home folder."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ANP_VS_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def mnist(data_dir):
    train = data.load_arrays("mnist", "train", data_dir=data_dir, download=False)
    test = data.load_arrays("mnist", "test", data_dir=data_dir, download=False)
    return train, test


def write_idx(path, array, magic):
    """An IDX file (gzipped if path ends in .gz) holding `array` under `magic`."""
    array = np.asarray(array, np.uint8)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def mini_mnist(folder, mnist, n_train=100, n_test=50, suffix=""):
    """Writes the first examples of MNIST as the 4 IDX files; returns {key: path}."""
    (x, y, _), (xt, yt, _) = mnist
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": (x[:n_train, ..., 0], IMAGES_MAGIC),
        "train_labels": (y[:n_train], LABELS_MAGIC),
        "test_images": (xt[:n_test, ..., 0], IMAGES_MAGIC),
        "test_labels": (yt[:n_test], LABELS_MAGIC),
    }
    return {
        key: write_idx(folder / (IDX_NAMES[key] + suffix), *arrays[key])
        for key in IDX_NAMES
    }


def one_line_error(call, *fragments):
    """Runs `call`, expecting a one-line DataError that contains every fragment."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


# --- IDX ------------------------------------------------------------------------------


def test_mnist_arrays(mnist, data_dir):
    (x, y, info), (xt, yt, _) = mnist
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert xt.shape == (10000, 28, 28, 1) and xt.dtype == np.uint8
    assert y.dtype == np.int64 and y.shape == (60000,) and yt.shape == (10000,)
    assert y[0] == 5
    assert np.bincount(y).tolist() == MNIST_TRAIN_COUNTS
    assert info["num_classes"] == 10 and info["input_shape"] == (28, 28, 1)
    assert info["source"] == str(data_dir / "mnist")


def test_mnist_load_pipeline(mnist, data_dir):
    (_, _, _), (_, yt, _) = mnist
    loaded = data.load("mnist", data_dir=data_dir, batch_size=500, download=False)
    assert loaded.info.num_train == 60000 and loaded.info.num_test == 10000
    assert loaded.info.num_validation == 0 and loaded.validation is None
    assert loaded.info.class_names == tuple("0123456789")
    images, labels = next(iter(loaded.test))
    assert images.shape == (500, 28, 28, 1) and images.dtype == tf.float32
    assert labels.dtype == tf.int32
    assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) == 1.0
    np.testing.assert_array_equal(labels.numpy(), yt[:500])  # test set keeps its order
    images, labels = next(iter(loaded.train))
    assert images.shape == (500, 28, 28, 1) and labels.shape == (500,)
    split = data.load("mnist", data_dir=data_dir, batch_size=64, eval_batch_size=1000, download=False)
    assert next(iter(split.train))[0].shape[0] == 64 and next(iter(split.test))[0].shape[0] == 1000


def test_data_dir_from_environment(mnist, data_dir, monkeypatch):
    monkeypatch.setenv("ANP_VS_DATA_DIR", str(data_dir))
    x, y, info = data.load_arrays("mnist", "test", download=False)
    (_, _, _), (_, yt, _) = mnist
    np.testing.assert_array_equal(y, yt)
    assert info["source"] == str(data_dir / "mnist")


def test_plain_idx_copy_loads_identically(mnist, data_dir, tmp_path):
    copy = tmp_path / "mnist"
    copy.mkdir()
    for name in IDX_NAMES.values():
        with gzip.open(data_dir / "mnist" / (name + ".gz")) as src:
            (copy / name).write_bytes(src.read())
    x, y, info = data.load_arrays("mnist", "train", data_dir=tmp_path, download=False)
    (x_ref, y_ref, _), _ = mnist
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)
    assert info["source"] == str(copy)


def test_truncated_idx_raises(mnist, tmp_path):
    paths = mini_mnist(tmp_path / "mnist", mnist)
    content = paths["train_images"].read_bytes()
    paths["train_images"].write_bytes(content[:-100])
    one_line_error(
        lambda: data.load_arrays("mnist", "train", data_dir=tmp_path, download=False),
        paths["train_images"], "truncated", "download it again",
    )


def test_padded_idx_raises(mnist, tmp_path):
    paths = mini_mnist(tmp_path / "mnist", mnist)
    with open(paths["test_labels"], "ab") as f:
        f.write(b"\0" * 7)
    one_line_error(
        lambda: data.load_arrays("mnist", "test", data_dir=tmp_path, download=False),
        paths["test_labels"], "7 bytes too long",
    )


def test_truncated_gzip_raises(mnist, tmp_path):
    paths = mini_mnist(tmp_path / "mnist", mnist, suffix=".gz")
    content = paths["train_images"].read_bytes()
    paths["train_images"].write_bytes(content[: len(content) // 2])
    one_line_error(
        lambda: data.load_arrays("mnist", "train", data_dir=tmp_path, download=False),
        paths["train_images"], "corrupt or truncated",
    )


def test_wrong_magic_raises(mnist, tmp_path):
    paths = mini_mnist(tmp_path / "mnist", mnist)
    (_, y, _), _ = mnist
    write_idx(paths["train_labels"], y[:100], IMAGES_MAGIC)
    one_line_error(
        lambda: data.load_arrays("mnist", "train", data_dir=tmp_path, download=False),
        paths["train_labels"], "magic number", "0x00000801",
    )


def test_count_mismatch_raises(mnist, tmp_path):
    paths = mini_mnist(tmp_path / "mnist", mnist)
    (_, y, _), _ = mnist
    write_idx(paths["train_labels"], y[:99], LABELS_MAGIC)
    one_line_error(
        lambda: data.load_arrays("mnist", "train", data_dir=tmp_path, download=False),
        "100 images", "99 labels",
    )


def test_labels_out_of_range_raise(mnist, tmp_path):
    paths = mini_mnist(tmp_path / "mnist", mnist)
    (_, y, _), _ = mnist
    labels = y[:100].copy()
    labels[17] = 10
    write_idx(paths["train_labels"], labels, LABELS_MAGIC)
    one_line_error(
        lambda: data.load_arrays("mnist", "train", data_dir=tmp_path, download=False),
        "include 10", "outside [0, 10)",
    )


def test_some_idx_files_missing_raises(mnist, tmp_path):
    paths = mini_mnist(tmp_path / "mnist", mnist)
    paths["test_labels"].unlink()
    one_line_error(
        lambda: data.load_arrays("mnist", "train", data_dir=tmp_path, download=False),
        "missing: t10k-labels-idx1-ubyte",
    )


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason=f"{FASHION_DIR} is absent "
                    "(Debian package dataset-fashion-mnist not installed)")
def test_fashion_mnist_from_system_folder(tmp_path):
    # An empty data_dir holds nothing, so the Debian package's folder is used.
    x, y, info = data.load_arrays("fashion_mnist", "train", data_dir=tmp_path, download=False)
    assert x.shape == (60000, 28, 28, 1) and y.shape == (60000,)
    assert np.bincount(y).tolist() == [6000] * 10
    assert info["source"] == FASHION_DIR and info["class_names"][0] == "T-shirt/top"


# --- finding data and checking arguments ----------------------------------------------


def test_nothing_found_names_folders(tmp_path):
    message = one_line_error(
        lambda: data.load("cifar100", data_dir=tmp_path, download=False),
        "no cifar100 data found", tmp_path / "cifar100", "ANP_VS_DATA_DIR", "download=True",
    )
    assert "tensorflow-datasets" in message


def test_folder_dataset_needs_a_tree(tmp_path):
    one_line_error(lambda: data.load("folder"), "needs data_dir")
    one_line_error(lambda: data.load("folder", data_dir=tmp_path), tmp_path, "train")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(name="imagenet"), "mnist, fashion_mnist, cifar10, cifar100, folder"),
        (dict(name="mnist", batch_size=0), "batch_size must be at least 1"),
        (dict(name="mnist", batch_size=2.5), "batch_size must be an integer"),
        (dict(name="mnist", train_subset=0), "train_subset must be at least 1"),
        (dict(name="mnist", validation_examples=-1), "validation_examples must be at least 0"),
        (dict(name="mnist", on_bad_file="ignore"), "on_bad_file must be one of skip, error"),
        (dict(name="mnist", augment="yes"), "augment must be"),
    ],
)
def test_arguments_are_checked_before_any_work(kwargs, fragment, tmp_path):
    # The data_dir does not exist: a "not found" error would mean work started first.
    one_line_error(lambda: data.load(data_dir=tmp_path / "missing", download=False, **kwargs),
                   fragment)


def test_load_arrays_checks_split():
    one_line_error(lambda: data.load_arrays("mnist", "validation"), "split must be one of")


# --- subsets and validation -----------------------------------------------------------


def test_class_balanced_subset():
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 2, 1, 0])
    subset = data.class_balanced_subset(labels, 5, 3)
    # 5 // 3 = 1 each, classes 0 and 1 get one more; earliest of each class; sorted.
    np.testing.assert_array_equal(subset, [0, 1, 2, 3, 5])
    np.testing.assert_array_equal(subset, data.class_balanced_subset(labels, 5, 3))
    one_line_error(lambda: data.class_balanced_subset(labels, 11, 3), "11", "set of 10")
    one_line_error(lambda: data.class_balanced_subset(labels, 8, 4), "class 3", "only 0")


def test_subsets_of_mnist(mnist, data_dir):
    (_, y, _), (_, yt, _) = mnist
    loaded = data.load("mnist", data_dir=data_dir, batch_size=256, train_subset=1000,
                       test_subset=105, download=False)
    assert loaded.info.num_train == 1000 and loaded.info.num_test == 105
    train_labels = np.concatenate([labels.numpy() for _, labels in loaded.train])
    assert np.bincount(train_labels).tolist() == [100] * 10
    test_labels = np.concatenate([labels.numpy() for _, labels in loaded.test])
    expected = data.class_balanced_subset(yt, 105, 10)
    np.testing.assert_array_equal(test_labels, yt[expected])  # original order kept
    assert np.bincount(test_labels).tolist() == [11] * 5 + [10] * 5


def test_validation_is_held_out_from_the_end(mnist, tmp_path):
    mini_mnist(tmp_path / "mnist", mnist, n_train=300)
    (x, y, _), _ = mnist
    x, y = x[:300], y[:300]
    loaded = data.load("mnist", data_dir=tmp_path, batch_size=7, train_subset=100,
                       validation_examples=50, download=False)
    assert (loaded.info.num_train, loaded.info.num_validation) == (100, 50)

    def batches(dataset):
        images = np.concatenate([b[0].numpy() for b in dataset])
        return np.round(images * 255).astype(np.uint8), np.concatenate([b[1] for b in dataset])

    val_x, val_y = batches(loaded.validation)
    # The last 5 examples of each class, in original order, not shuffled.
    expected = np.sort(np.concatenate([np.flatnonzero(y == c)[-5:] for c in range(10)]))
    np.testing.assert_array_equal(val_y, y[expected])
    np.testing.assert_array_equal(val_x, x[expected])
    np.testing.assert_array_equal(batches(loaded.validation)[1], val_y)

    train_x, train_y = batches(loaded.train)
    train_rows = {row.tobytes() for row in train_x}
    assert len(train_rows) == 100
    assert not train_rows & {row.tobytes() for row in val_x}
    assert np.bincount(train_y).tolist() == [10] * 10

    one_line_error(
        lambda: data.load("mnist", data_dir=tmp_path, train_subset=250, validation_examples=50,
                          download=False),
        "validation_examples=50", "train_subset=250",
    )


# --- pipelines ------------------------------------------------------------------------


def epochs(dataset, count):
    return [np.concatenate([labels.numpy() for _, labels in dataset]) for _ in range(count)]


def test_shuffle_is_deterministic_and_differs_between_epochs():
    images = np.zeros((100, 2, 2, 1), np.uint8)
    labels = np.arange(100)
    first = epochs(data.make_dataset(images, labels, 32, training=True, seed=3), 2)
    again = epochs(data.make_dataset(images, labels, 32, training=True, seed=3), 2)
    other = epochs(data.make_dataset(images, labels, 32, training=True, seed=4), 1)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert sorted(first[0]) == list(range(100))
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], other[0])
    kept = epochs(data.make_dataset(images, labels, 32, training=False), 1)[0]
    np.testing.assert_array_equal(kept, labels)
    dropped = data.make_dataset(images, labels, 32, training=False, drop_remainder=True)
    assert [int(b[1].shape[0]) for b in dropped] == [32, 32, 32]


def test_augmentation_crops_padded_image_and_flips_deterministically():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(16, 8, 8, 3), dtype=np.uint8)  # no zeros: padding shows
    labels = np.arange(16)

    def run():
        dataset = data.make_dataset(images, labels, 16, training=True, seed=1, augment=True)
        return [(b[0].numpy(), b[1].numpy()) for _ in range(2) for b in dataset]  # 2 epochs

    first, again = run(), run()
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)

    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
    changed = 0
    for batch, labels_ in first:
        for image, label in zip(np.round(batch * 255).astype(np.uint8), labels_):
            crops = [
                view
                for dy in range(9)
                for dx in range(9)
                for view in (padded[label, dy:dy + 8, dx:dx + 8],
                             padded[label, dy:dy + 8, dx:dx + 8][:, ::-1])
            ]
            assert any(np.array_equal(image, crop) for crop in crops)
            changed += not np.array_equal(image, images[label])
    assert changed > 20  # almost every one of the 32 views is moved or flipped

    plain = data.make_dataset(images, labels, 16, training=False, augment=True)
    np.testing.assert_array_equal(np.round(next(iter(plain))[0].numpy() * 255), images)


def as_arrays(dataset, steps=None):
    dataset = dataset if steps is None else dataset.take(steps)
    return [(images.numpy(), labels.numpy()) for images, labels in dataset]


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for (x, y), (x_expected, y_expected) in zip(actual, expected):
        np.testing.assert_array_equal(y, y_expected)
        np.testing.assert_array_equal(x, x_expected)


@pytest.mark.parametrize("augment", [False, True])
def test_train_is_the_resumable_stream_one_epoch_per_pass(mnist, tmp_path, augment):
    mini_mnist(tmp_path / "mnist", mnist, n_train=100)
    loaded = data.load("mnist", data_dir=tmp_path, batch_size=32, seed=7, augment=augment,
                       download=False)
    steps = data.steps_per_epoch(100, 32)
    next(iter(loaded.train))  # a pass given up early is not an epoch
    first = as_arrays(loaded.train)
    assert [len(y) for _, y in first] == [32, 32, 32, 4]
    assert_same_batches(first, as_arrays(loaded.train_from(0), steps))
    assert_same_batches(as_arrays(loaded.train), as_arrays(loaded.train_from(steps), steps))
    (x, _, _), _ = mnist
    stored = {image.tobytes() for image in x[:100]}
    moved = sum(np.round(image * 255).astype(np.uint8).tobytes() not in stored
                for images, _ in first for image in images)
    assert (moved > 50) if augment else moved == 0


def test_fit_on_train_sees_the_streams_epochs(mnist, tmp_path):
    """Keras opens more iterators than it trains on; the epochs still follow the stream."""
    import keras

    mini_mnist(tmp_path / "mnist", mnist, n_train=100)
    loaded = data.load("mnist", data_dir=tmp_path, batch_size=32, seed=7, download=False)
    seen = []

    class Recorder(keras.Model):
        def train_step(self, batch):
            tf.py_function(lambda labels: seen.append(labels.numpy()) or 0, [batch[1]], tf.int32)
            return {"batches": tf.constant(1.0)}

    inputs = keras.Input((28, 28, 1))
    model = Recorder(inputs, keras.layers.Flatten()(inputs))
    model.compile()
    model.fit(loaded.train, epochs=3, shuffle=False, verbose=0)
    expected = [y for _, y in as_arrays(loaded.train_from(0), 3 * data.steps_per_epoch(100, 32))]
    assert len(seen) == len(expected)
    for labels, labels_expected in zip(seen, expected):
        np.testing.assert_array_equal(labels, labels_expected)


# --- image folders --------------------------------------------------------------------


def make_tree(root, data_dir, classes=("airplane", "bird", "cat"), n_train=4, n_test=2):
    """A small image-folder tree of real CIFAR-10 JPEGs."""
    source = data_dir / "cifar10-jpeg"
    for split, n in (("train", n_train), ("test", n_test)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                shutil.copy(source / split / name / f"{i:04d}.jpg", root / split / name)
    return root


def test_image_folder_skips_or_rejects_bad_files(data_dir, tmp_path, caplog):
    tree = make_tree(tmp_path / "tree", data_dir)
    bad = tree / "train" / "bird" / "0099.jpg"
    bad.write_bytes(b"this is not a JPEG")

    with caplog.at_level(logging.WARNING):
        x, y, info = data.load_arrays("folder", "train", data_dir=tree)
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert info["class_names"] == ("airplane", "bird", "cat") and info["num_classes"] == 3
    assert "skipped 1 unreadable image file" in caplog.text and str(bad) in caplog.text

    # The JPEGs decode to exactly what TensorFlow makes of the original files.
    first = tf.io.decode_jpeg(tf.io.read_file(str(tree / "train" / "airplane" / "0000.jpg")))
    np.testing.assert_array_equal(x[0], first.numpy())

    # The error mode raises even when the arrays come from the cache.
    one_line_error(lambda: data.load_arrays("folder", "train", data_dir=tree, on_bad_file="error"),
                   bad, "on_bad_file='skip'")


def test_image_folder_cache_is_used_and_rebuilt_when_corrupt(data_dir, tmp_path, monkeypatch,
                                                             cache_dir):
    tree = make_tree(tmp_path / "tree", data_dir)
    x, y, _ = data.load_arrays("folder", "test", data_dir=tree)
    (cache_file,) = cache_dir.glob("*.npz")
    decode = image_folder._decode

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(image_folder, "_decode", no_decoding)
    x2, y2, _ = data.load_arrays("folder", "test", data_dir=tree)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)

    cache_file.write_bytes(b"garbage")
    monkeypatch.setattr(image_folder, "_decode", decode)
    x3, _, _ = data.load_arrays("folder", "test", data_dir=tree)
    np.testing.assert_array_equal(x, x3)
    assert cache_file.stat().st_size > 1000  # rebuilt
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp")]

    # A changed file list gives a new cache entry.
    (tree / "test" / "cat" / "0001.jpg").unlink()
    assert len(data.load_arrays("folder", "test", data_dir=tree)[0]) == 5


def test_image_folder_class_mismatch_raises(data_dir, tmp_path):
    tree = make_tree(tmp_path / "tree", data_dir)
    (tree / "test" / "cat").rename(tree / "test" / "dog")
    one_line_error(lambda: data.load("folder", data_dir=tree),
                   "only in train: ['cat']", "only in test: ['dog']")


def test_image_folder_mixed_shapes_raise(data_dir, tmp_path):
    tree = make_tree(tmp_path / "tree", data_dir)
    odd = tree / "train" / "cat" / "0050.png"
    odd.write_bytes(tf.io.encode_png(np.zeros((28, 28, 1), np.uint8)).numpy())
    one_line_error(lambda: data.load_arrays("folder", "train", data_dir=tree),
                   odd, "28x28x1", "32x32x3")


def test_grayscale_tree_loads_as_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, size=(5, 7, 1), dtype=np.uint8)
                (tmp_path / split / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    loaded = data.load("folder", data_dir=tmp_path, batch_size=4, validation_examples=2)
    info = loaded.info
    assert (info.input_shape, info.num_classes, info.class_names) == ((5, 7, 1), 2, ("a", "b"))
    assert (info.num_train, info.num_validation, info.num_test) == (10, 2, 4)
    assert info.source == str(tmp_path)
    images, _ = next(iter(loaded.test))
    assert images.shape == (4, 5, 7, 1)


def test_cifar10_test_split(data_dir):
    x, y, info = data.load_arrays("cifar10", "test", data_dir=data_dir, download=False)
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    assert info["class_names"] == data.DATASETS["cifar10"].class_names
    assert info["source"] == str(data_dir / "cifar10-jpeg")
