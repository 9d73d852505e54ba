"""Shared by the benchmarks: time training in windows of steps, runs interleaved.

This machine's speed drifts by tens of percent over minutes (a shared VM), so runs
that are compared are timed in alternation, one window each in turn: a drift then
hits every run alike and the ratios stay meaningful.
"""

import time

import keras
import numpy as np


class _Clock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.started = None
        self.stamps = []

    def on_train_batch_begin(self, batch, logs=None):
        if self.started is None:
            self.started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.stamps.append(time.perf_counter())


def fit_window(model, dataset, steps, count_first=False):
    """A `run_window` for a Keras model: seconds of `steps` training steps.

    One `fit` call of `steps` more than one execution (Keras' `steps_per_execution`
    steps, 1 by default), timed from the end of the first execution to the end of the
    last, so the call's setup is not counted. The compiled step is reused from call
    to call. count_first: a call of `steps` steps only, timed from the start of the
    first: for steps of many seconds, where the setup is lost in the noise and one
    step more per window is minutes more per run.
    """
    per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
    if steps % per_execution:
        raise ValueError(f"steps ({steps}) must be a multiple of steps_per_execution ({per_execution})")

    def run_window():
        clock = _Clock()
        model.fit(dataset, steps_per_epoch=steps + (0 if count_first else per_execution), epochs=1, verbose=0,
                  callbacks=[clock])
        return clock.stamps[-1] - (clock.started if count_first else clock.stamps[0])

    return run_window


def interleaved_seconds(runs, windows):
    """{name: array of seconds per window}: one warm-up window each, then `windows`
    rounds in which every run times one window, in turn."""
    for run_window in runs.values():
        run_window()  # traces and warms caches
    seconds = {name: [] for name in runs}
    for _ in range(windows):
        for name, run_window in runs.items():
            seconds[name].append(run_window())
    return {name: np.array(values) for name, values in seconds.items()}


def median_rate(seconds, examples_per_window):
    """Examples per second of the median window."""
    return float(examples_per_window / np.median(seconds))
