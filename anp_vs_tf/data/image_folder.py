"""Reader for an image-folder tree: root/train/<class>/<file> and root/test/<class>/<file>.

Class names are the sorted subfolder names of train/, so labels follow alphabetical
order. Files are decoded by TensorFlow in a parallel tf.data map, because decoding
tens of thousands of small JPEGs one at a time in eager Python is far too slow, and
the decoded arrays are cached as an .npz keyed by the file list (names, sizes,
mtimes), so loading the same tree again reads one file.
"""

import hashlib
import logging
import os
from collections import Counter

import numpy as np
import tensorflow as tf

from anp_vs_tf.data.errors import DataError
from anp_vs_tf.files import atomic_write

SPLITS = ("train", "test")
CACHE_VERSION = 1  # bump when the cached content changes meaning
_BATCH = 1024

log = logging.getLogger(__name__)


def default_cache_dir():
    """$ANP_VS_CACHE_DIR, else ~/.cache/anp_vs_tf."""
    return os.environ.get("ANP_VS_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "anp_vs_tf"
    )


def is_image_folder(root):
    """True if root/train and root/test both exist and hold at least one class folder."""
    return all(_subfolders(os.path.join(root, split)) for split in SPLITS)


def class_names(root):
    """The sorted class folder names of root/train; root/test must have the same ones."""
    train, test = (_subfolders(os.path.join(root, split)) for split in SPLITS)
    if not train:
        raise DataError(
            f"{os.path.join(root, 'train')} has no class folders: "
            "expected <root>/train/<class>/<image files> and <root>/test/<class>/<image files>"
        )
    if train != test:
        only_train = sorted(set(train) - set(test)) or "none"
        only_test = sorted(set(test) - set(train)) or "none"
        raise DataError(
            f"the class folders of {os.path.join(root, 'train')} and {os.path.join(root, 'test')} "
            f"differ (only in train: {only_train}; only in test: {only_test}); "
            "give both splits the same class folders"
        )
    return tuple(train)


def load_image_folder(root, split, on_bad_file="skip", cache_dir=None):
    """(images uint8 (N, H, W, C), labels int64 (N,), class names) of root/<split>.

    Channels are what the files have. Unreadable files are skipped with a warning
    (on_bad_file="skip") or raise a DataError naming the first one ("error").
    """
    classes = class_names(root)
    split_dir = os.path.abspath(os.path.join(root, split))
    paths, labels, key = _list_files(split_dir, classes)
    if not paths:
        raise DataError(
            f"{split_dir} has class folders but no files; put the {split} images in them"
        )

    cache_path = os.path.join(cache_dir or default_cache_dir(), f"image-folder-{split}-{key}.npz")
    cached = _read_cache(cache_path)
    if cached is None:
        cached = _decode(paths, labels, split_dir)
        _write_cache(cache_path, cached)
    images, labels, bad_files = cached

    if len(bad_files):
        if on_bad_file == "error":
            raise DataError(
                f"{bad_files[0]} is not a readable image ({len(bad_files)} unreadable file(s) in "
                f"{split_dir}); fix or remove it, or pass on_bad_file='skip'"
            )
        log.warning(
            "skipped %d unreadable image file(s) in %s (first: %s)",
            len(bad_files), split_dir, bad_files[0],
        )
    return images, labels, classes


def _subfolders(path):
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError:  # missing, not a folder, or unreadable: not a tree
        return []


def _list_files(split_dir, classes):
    """Files in class then name order, their labels, and a hash of (names, sizes, mtimes)."""
    paths, labels = [], []
    digest = hashlib.sha256(f"v{CACHE_VERSION}\n{split_dir}\n{classes}\n".encode())
    for label, name in enumerate(classes):
        try:
            entries = sorted(
                (e for e in os.scandir(os.path.join(split_dir, name))
                 if e.is_file() and not e.name.startswith(".")),
                key=lambda e: e.name,
            )
        except OSError as e:
            raise DataError(f"cannot list {e.filename}: {e.strerror}; check its permissions") from e
        for entry in entries:
            stat = entry.stat()
            paths.append(entry.path)
            labels.append(label)
            digest.update(f"{name}/{entry.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return paths, np.asarray(labels, np.int64), digest.hexdigest()[:24]


def _decode(paths, labels, split_dir):
    """(images, labels, bad file paths): every file decoded in a parallel tf.data map.

    A file whose read or decode fails is dropped by ignore_errors(); its index is then
    missing from the output, which is how the bad files are found.
    """

    def decode(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        return index, tf.shape(image), image

    dataset = (
        tf.data.Dataset.from_tensor_slices((tf.range(len(paths)), paths))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors()
        .padded_batch(_BATCH)  # pads only if shapes differ, which is checked below
        .prefetch(tf.data.AUTOTUNE)
    )
    batches = list(dataset.as_numpy_iterator())
    good = np.concatenate([b[0] for b in batches]) if batches else np.zeros(0, np.int64)
    bad_files = np.asarray(np.delete(np.asarray(paths), good), dtype=str)
    if not len(good):
        raise DataError(
            f"none of the {len(paths)} files in {split_dir} is a readable image; "
            "check that they are JPEG, PNG, BMP or GIF files"
        )

    shapes = np.concatenate([b[1] for b in batches])
    common, count = Counter(map(tuple, shapes)).most_common(1)[0]
    if count != len(shapes):
        odd = int(np.flatnonzero((shapes != common).any(axis=1))[0])
        raise DataError(
            f"images in {split_dir} must all have one shape, but {paths[good[odd]]} is "
            f"{'x'.join(map(str, shapes[odd]))} while {count} of {len(shapes)} are "
            f"{'x'.join(map(str, common))}; resize or convert the odd ones"
        )
    images = np.concatenate([b[2] for b in batches])
    return images, labels[good], bad_files


def _read_cache(path):
    """The cached (images, labels, bad files), or None if absent or unreadable (then rebuilt)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels, bad_files = npz["images"], npz["labels"], npz["bad_files"]
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("unexpected content")
        return images, labels.astype(np.int64), bad_files
    except Exception as e:  # any damage to the file means "rebuild it"
        log.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, e)
        return None


def _write_cache(path, arrays):
    """Writes atomically (`files.atomic_write`) so a reader never sees half a file."""
    images, labels, bad_files = arrays
    try:
        atomic_write(path, lambda tmp: np.savez(tmp, images=images, labels=labels, bad_files=bad_files))
    except OSError as e:  # a cache is an optimization: never fail the load over it
        log.warning(
            "cannot write cache file %s (%s); set ANP_VS_CACHE_DIR to a writable folder", path, e
        )
