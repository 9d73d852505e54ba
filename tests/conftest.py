"""Shared pytest fixtures."""
import os
import pathlib

import pytest


@pytest.fixture(scope="session")
def data_dir():
    """The offline data folder: $ANP_VS_DATA_DIR, else <repo>/../shared/data."""
    default = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    env = os.environ.get("ANP_VS_DATA_DIR")
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(default)
    for path in candidates:
        if path.is_dir():
            return path
    pytest.fail(
        f"no test data folder: looked in {', '.join(map(str, candidates))}; "
        "set ANP_VS_DATA_DIR to the shared data folder (see shared/data/README.md)",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def mnist_subset(data_dir):
    """Real MNIST as float arrays in [0, 1]: a 6,000-image balanced training subset and 1,000 test images."""
    from anp_vs_tf.data import class_balanced_subset, load_arrays

    def split(name, n):
        images, labels, _ = load_arrays("mnist", name, data_dir=data_dir, download=False)
        keep = class_balanced_subset(labels, n, 10)
        return images[keep].astype("float32") / 255.0, labels[keep].astype("int32")

    x_train, y_train = split("train", 6000)
    x_test, y_test = split("test", 1000)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="session")
def trained_lenet(mnist_subset):
    """A LeNet-5-Caffe trained (standard) for two epochs on the MNIST subset: about 96% clean accuracy."""
    import keras

    from anp_vs_tf import models
    from anp_vs_tf.trainers import RobustModel

    x, y, _, _ = mnist_subset
    keras.utils.set_random_seed(0)
    model = RobustModel(models.lenet5_caffe(), "standard", seed=0)
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=128, epochs=2, verbose=0, shuffle=True)
    return model
