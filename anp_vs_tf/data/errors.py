"""The one exception data loading raises, and the argument checks that raise it.

The checks live together so every module of the package words a bad argument the same
way, and so load() can check all its arguments before any data is read.
"""

import numpy as np


class DataError(Exception):
    """The data cannot be found or read. The message is one line: what is wrong and what to do."""


def check_int(value, what, minimum):
    """An integer (not a bool) of at least `minimum` (None: any integer)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise DataError(f"{what} must be at least {minimum}, got {value}")


def check_choice(value, choices, what):
    if value not in choices:
        raise DataError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def shape_text(shape):
    """(28, 28, 1) as "28x28x1", as messages write image shapes."""
    return "x".join(map(str, shape))
