"""Reader for the IDX files of the original MNIST and Fashion-MNIST distributions.

An IDX file is a big-endian uint32 magic number 0x000008DD (0x08: unsigned bytes,
DD: number of dimensions), DD big-endian uint32 sizes, then the bytes themselves.
Files may be gzipped (`*.gz`) or plain. Everything is checked before use, because a
truncated download otherwise turns into silently misaligned images and labels.
"""

import gzip
import os
import zlib

import numpy as np

from anp_vs_tf.data.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# split -> (images file, labels file), without the optional ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_files(folder):
    """{split: (images path, labels path)} if `folder` holds all four IDX files, else None.

    A folder with only some of them raises: that is a broken download, not "no data here".
    """
    found, missing = {}, []
    for stem in (stem for pair in IDX_FILES.values() for stem in pair):
        path = next(
            (p for p in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz"))
             if os.path.isfile(p)),
            None,
        )
        if path is None:
            missing.append(stem)
        else:
            found[stem] = path
    if not found:
        return None
    if missing:
        raise DataError(
            f"{folder} holds only some of the IDX files (missing: {', '.join(missing)}); "
            "download the missing ones (plain or .gz) into it"
        )
    return {split: (found[images], found[labels]) for split, (images, labels) in IDX_FILES.items()}


def read_idx(path, magic):
    """The array stored in the IDX file at `path`, checked against the expected magic number."""
    data = _read_bytes(path)
    redownload = "the file is corrupt or truncated; delete it and download it again"
    if len(data) < 4:
        raise DataError(f"{path} is only {len(data)} bytes long: {redownload}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"{path} starts with magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"(IDX {'images' if magic == IMAGES_MAGIC else 'labels'}): {redownload}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} ends inside its header: {redownload}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else f"{len(data) - expected} bytes too long"
        raise DataError(
            f"{path} is {what}: its header says {'x'.join(map(str, shape))} values "
            f"({expected} bytes) but it has {len(data)} bytes; {redownload}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_idx(images_path, labels_path):
    """(images uint8 (N, H, W, 1), labels int64 (N,)) from one split's pair of IDX files."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            "labels; they come from different downloads, get both files again"
        )
    return images[..., np.newaxis], labels.astype(np.int64)


def _read_bytes(path):
    """The (decompressed) content of `path`; a broken gzip is a DataError, not a traceback."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"{path} cannot be decompressed ({e}): the file is corrupt or truncated; "
            "delete it and download it again"
        ) from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check that it is readable") from e
