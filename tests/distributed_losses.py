"""Helper for test_distribute.py: train 20 steps per run and write the loss after every step.

    python tests/distributed_losses.py OUT.json STRATEGY:METHOD [STRATEGY:METHOD ...]

STRATEGY is one (a single device), mirrored (two logical CPU devices) or multi_worker
(TF_CONFIG names the workers; every worker runs this script, the chief writes OUT).
The data is the same 1,280 real MNIST training images in the same order for every
run, in global batches of 64. OUT maps "STRATEGY:METHOD" to the losses.
"""

import json
import sys

import tensorflow as tf

OUT, RUNS = sys.argv[1], [run.split(":") for run in sys.argv[2:]]
if any(strategy == "mirrored" for strategy, _ in RUNS):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from anp_vs_tf import attacks, data, distribute, models  # noqa: E402
from anp_vs_tf.trainers import RobustModel, get_method  # noqa: E402

STEPS, BATCH = 20, 64


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def make_strategy(name):
    if name == "one":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    return distribute.make_strategy("multi_worker")


def losses(strategy, method_name, dataset):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        method = get_method(method_name, beta_kl=4.0, lambda_vs=1.0, num_train_examples=60000)
        backbone = models.lenet5_caffe(prunable=method.prunes, mask_kwargs=dict(a_init=2.0, seed=0))
        model = RobustModel(backbone, method, adversary=attacks.PGD(0.3, 0.1, 3), seed=0)
        mask_optimizer = keras.optimizers.Adam(1e-2) if method.prunes else None
        model.compile(keras.optimizers.Adam(1e-3), mask_optimizer=mask_optimizer)
    record = StepLosses()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[record])
    return {"replicas": strategy.num_replicas_in_sync, "losses": record.losses}


def main():
    # A multi-worker strategy must exist before TensorFlow runs its first op.
    strategies = {name: make_strategy(name) for name in dict.fromkeys(name for name, _ in RUNS)}
    images, labels, _ = data.load_arrays("mnist", "train", download=False)
    keep = data.class_balanced_subset(labels, STEPS * BATCH, 10)
    x = images[keep].astype("float32") / 255.0
    y = labels[keep].astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    results = {
        f"{strategy}:{method}": losses(strategies[strategy], method, dataset) for strategy, method in RUNS
    }
    if distribute.is_chief():
        with open(OUT, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
