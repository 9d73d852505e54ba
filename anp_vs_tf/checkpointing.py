"""Training state that survives being killed: checkpoints every epoch and on demand.

A checkpoint (tf.train.CheckpointManager, written atomically: the index that names the
latest checkpoint is replaced only once the new one is complete) holds the model's
variables (weights, mask parameters, method state such as ADMM's), both optimizers
(slots and step counter) and nothing else, because everything else is a function of
the step counter: the data position (`data.training_stream`), the epoch, and every
random draw of a training step (`RobustModel.step_seed`). Restoring it and training on
gives the same weights as never having stopped.

`CheckpointCallback` saves at the end of every epoch and, on demand, after the step in
which the process receives SIGUSR1 (save and go on) or SIGTERM (save and stop).
`NanGuard` stops a run whose loss turns NaN or infinite before anything is saved, and
a state whose weights are not finite is never written.
"""

import signal

import keras
import numpy as np
import tensorflow as tf


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


class TrainingState:
    """The checkpoints of one run, written to `directory`.

    restore_from: where to look for the checkpoint to resume from, if not `directory`:
    a non-chief worker writes to a private folder (its files are only needed to keep
    the collective save in step) but resumes from the chief's checkpoints.
    """

    def __init__(self, model, directory, max_to_keep=2, restore_from=None):
        objects = {"model": model, "optimizer": model.optimizer}
        if getattr(model, "mask_optimizer", None) is not None:
            objects["mask_optimizer"] = model.mask_optimizer
        self.model = model
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=max_to_keep)
        self.restore_from = restore_from

    @property
    def step(self):
        return int(self.model.optimizer.iterations.numpy())

    @property
    def latest(self):
        """Path of the newest complete checkpoint, or None."""
        return self.manager.latest_checkpoint

    def restore(self):
        """Load the newest checkpoint if there is one; returns the step it resumes at."""
        path = tf.train.latest_checkpoint(self.restore_from) if self.restore_from else self.latest
        if path is not None:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return self.step

    def save(self):
        """Write a checkpoint, unless the weights are no longer finite (never save a diverged state)."""
        if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.trainable_variables):
            raise TrainingDiverged(
                f"the weights became NaN or infinite by step {self.step}; the last good checkpoint is "
                f"{self.latest or 'none (no epoch finished)'}. Lower the learning rates or check the "
                "data; nothing was saved after that checkpoint."
            )
        return self.manager.save(checkpoint_number=self.step)


class CheckpointCallback(keras.callbacks.Callback):
    """Saves the training state every epoch, and after a step when a signal asks for it."""

    def __init__(self, state):
        super().__init__()
        self.state = state
        self.requested = None  # the signal number that asked, until served
        self.stopped_by_signal = False
        self._previous = {}

    def _request(self, signum, frame):
        self.requested = signum

    def on_train_begin(self, logs=None):
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._request)
            except ValueError:  # not the main thread: no signal handling
                pass

    def on_train_end(self, logs=None):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, batch, logs=None):
        if self.requested is None:
            return
        signum, self.requested = self.requested, None
        path = self.state.save()
        print(f"\ncheckpoint {path} saved at step {self.state.step} ({signal.Signals(signum).name})", flush=True)
        if signum == signal.SIGTERM:
            self.stopped_by_signal = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if not self.stopped_by_signal:
            self.state.save()


class NanGuard(keras.callbacks.Callback):
    """Raises TrainingDiverged at the first step whose loss is not finite."""

    def __init__(self, state):
        super().__init__()
        self.state = state

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise TrainingDiverged(
                f"the loss became {float(loss)} at step {self.state.step}; the last good checkpoint "
                f"is {self.state.latest or 'none (no epoch finished)'}. Lower the learning rates or "
                "check the data; nothing was saved after that checkpoint."
            )
