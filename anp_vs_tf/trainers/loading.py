"""Loading a model this package saved, with one clear line when a file is not one."""

import os
import zipfile

import keras

from anp_vs_tf.trainers.robust_model import RobustModel


def load_robust_model(path):
    """The `RobustModel` saved at `path` (a `.keras` file), or ValueError saying why not."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file; pass a .keras model saved by anp_vs_tf.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .keras model file (the zip archive model.save() writes).")
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # keras raises many kinds for a file that is not a model
        first = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} could not be loaded as a Keras model ({first}).") from None
    if not isinstance(model, RobustModel):
        raise ValueError(f"{path} is a {type(model).__name__}, not an anp_vs_tf RobustModel.")
    return model
