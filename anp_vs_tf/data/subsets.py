"""Class-balanced subsets and the validation split, as sorted indices into a split.

Both take the earliest (subsets) or latest (validation) examples of each class, with no
randomness, so a subset is the same on every run and machine, a larger subset contains
a smaller one, and the validation set never overlaps a training subset.
"""

import numpy as np

from anp_vs_tf.data.errors import DataError, check_int


def class_balanced_subset(labels, n, num_classes):
    """Sorted indices of n examples: n // K per class (one more for the first n % K classes).

    Takes the earliest examples of each class, so a subset is deterministic and a
    larger subset contains a smaller one.
    """
    check_int(n, "subset size", 0)
    labels = np.asarray(labels)
    if n > len(labels):
        raise DataError(f"cannot take {n} examples from a set of {len(labels)}; ask for fewer")
    quotas = _quotas(n, num_classes)
    picked = []
    for label, quota in enumerate(quotas):
        members = np.flatnonzero(labels == label)
        if len(members) < quota:
            raise DataError(
                f"a class-balanced subset of {n} needs {quota} examples of class {label}, "
                f"but there are only {len(members)}; ask for fewer"
            )
        picked.append(members[:quota])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def split_validation(labels, train_subset, validation_examples, num_classes):
    """(validation indices, train indices): validation from the end of each class.

    train_subset (None: all the rest) is a class-balanced subset of what validation
    leaves; validation_examples=0 gives no validation set.
    """
    if validation_examples == 0:
        train = np.arange(len(labels)) if train_subset is None else class_balanced_subset(
            labels, train_subset, num_classes
        )
        return np.zeros(0, np.int64), train

    if train_subset is None and validation_examples >= len(labels):
        raise DataError(
            f"validation_examples={validation_examples} leaves none of the {len(labels)} "
            "training examples to train on; ask for fewer"
        )
    counts = np.bincount(labels, minlength=num_classes)
    need = np.add(
        _quotas(validation_examples, num_classes), _quotas(train_subset or 0, num_classes)
    )
    short = np.flatnonzero(need > counts)
    if short.size:
        c = int(short[0])
        raise DataError(
            f"validation_examples={validation_examples} with train_subset={train_subset} needs "
            f"{need[c]} training examples of class {c} but there are {counts[c]}; ask for fewer"
        )
    # The last examples of each class are the first ones of the reversed array.
    reversed_idx = class_balanced_subset(labels[::-1], validation_examples, num_classes)
    validation = np.sort(len(labels) - 1 - reversed_idx)
    rest = np.setdiff1d(np.arange(len(labels)), validation)
    if train_subset is None:
        return validation, rest
    return validation, rest[class_balanced_subset(labels[rest], train_subset, num_classes)]


def _quotas(n, num_classes):
    """Examples per class in a balanced set of n: the first n % K classes get one more."""
    return [n // num_classes + (label < n % num_classes) for label in range(num_classes)]
