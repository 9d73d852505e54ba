"""Data sets as batched tf.data pipelines of (float32 image in [0, 1], int label).

`load(name, ...)` finds the data (a local folder, a system package, or
tensorflow-datasets) and returns Data(train, test, validation, info).
"""

from anp_vs_tf.data.datasets import (
    DATASETS,
    Data,
    DataInfo,
    DatasetSpec,
    class_balanced_subset,
    load,
    load_arrays,
    make_dataset,
    steps_per_epoch,
    training_stream,
)
from anp_vs_tf.data.errors import DataError

__all__ = [
    "DATASETS",
    "Data",
    "DataError",
    "DataInfo",
    "DatasetSpec",
    "class_balanced_subset",
    "load",
    "load_arrays",
    "make_dataset",
    "steps_per_epoch",
    "training_stream",
]
