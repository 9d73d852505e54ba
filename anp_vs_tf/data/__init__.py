"""Data sets as batched tf.data pipelines of (float32 image in [0, 1], int label).

`load(name, ...)` finds the data (a local folder, a system package, or
tensorflow-datasets) and returns Data(train, test, validation, info, train_from).

One job per module: `sources` (which data sets exist, where their files are found and
read), `subsets` (class-balanced subsets, the validation split), `pipeline` (batching,
the one shuffle and the one augmentation), `loading` (load(), joining them), `idx` and
`image_folder` (the two file formats), `errors` (DataError and the argument checks).
"""

from anp_vs_tf.data.errors import DataError
from anp_vs_tf.data.loading import Data, DataInfo, load
from anp_vs_tf.data.pipeline import make_dataset, steps_per_epoch, training_stream
from anp_vs_tf.data.sources import DATASETS, DatasetSpec, load_arrays
from anp_vs_tf.data.subsets import class_balanced_subset

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
