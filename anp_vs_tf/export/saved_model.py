"""`export(model, export_dir, version)`: the compact model as a TF Serving SavedModel.

    export_dir/N/saved_model.pb, variables/   the SavedModel TF Serving loads (version N)
    export_dir/N/compact.keras                the compact Keras model
    export_dir/N/export.json                  widths before/after, params, FLOPs, file sizes

The `serving_default` signature takes `images`, a float32 batch [None, H, W, C] of
pixels in [0, 1], and returns `logits` and `probabilities` (softmax). It holds only
standard TensorFlow ops, so serving needs nothing from this package.

Versions are never overwritten: the version folder is written under a hidden name and
renamed into place at the end, so TF Serving, which watches export_dir, never sees a
half-written version, and an existing version is refused before any work.
"""

import datetime
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from anp_vs_tf.export.compact import compact, has_masks
from anp_vs_tf.metrics.complexity import complexity
from anp_vs_tf.precision import float32_copy
from anp_vs_tf.trainers.loading import load_robust_model
from anp_vs_tf.version import __version__

SIGNATURE = "serving_default"
KERAS_FILE = "compact.keras"
REPORT_FILE = "export.json"
# The compact model must reproduce the masked one on this self-check, or nothing is written.
_CHECK_EXAMPLES, _CHECK_TOLERANCE = 16, 1e-4


def version_dir(export_dir, version):
    """export_dir/version, after checking the version is a positive integer and is new."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"the export version must be a positive integer (TF Serving's layout), got {version!r}.")
    target = os.path.join(export_dir, str(int(version)))
    if os.path.exists(target):
        raise ValueError(f"{target} already exists; versions are never overwritten, choose a new --version.")
    return target


def export(model, export_dir, version=1, source_path=None, verbose=True):
    """Write `compact(model)` as version `version` under `export_dir`; returns export.json's content.

    model: a RobustModel or a backbone. source_path: the file it was loaded from, whose
    size goes into export.json. A model without Beta-Bernoulli masks is exported with
    its widths unchanged and a note saying so. A mixed-precision model is exported as
    its float32 copy (`anp_vs_tf.precision`): what is served computes in float32.
    """
    target = version_dir(export_dir, version)
    model = float32_copy(model)
    backbone = getattr(model, "backbone", model)
    try:
        small = compact(model)
    except ValueError as error:
        raise ValueError(f"cannot export {backbone.name}: {error}") from None
    notes = []
    if not has_masks(model):
        notes.append(f"{backbone.name} has no Beta-Bernoulli layers: nothing to prune, exported unchanged.")
    max_diff = _self_check(model, small)
    os.makedirs(export_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{version}.partial-", dir=export_dir)
    try:
        _write_saved_model(small, staging)
        small.save(os.path.join(staging, KERAS_FILE))
        report = _report(model, small, version, source_path, staging, notes, max_diff)
        with open(os.path.join(staging, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
        os.rename(staging, target)  # fails if the version appeared meanwhile: never overwrite
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if verbose:
        for note in notes:
            print(f"note: {note}")
        print(_summary(target, report))
    return report


def export_file(model_path, export_dir, version=1, verbose=True):
    """Load a .keras model saved by anp_vs_tf and export it (ValueError on refusal,
    before anything is written)."""
    version_dir(export_dir, version)  # refuse before loading anything
    return export(load_robust_model(model_path), export_dir, version, source_path=model_path, verbose=verbose)


def serving_signature(small):
    """The tf.function TF Serving calls: float32 images -> {"logits", "probabilities"}."""
    spec = tf.TensorSpec((None,) + tuple(small.input_shape[1:]), tf.float32, name="images")

    @tf.function(input_signature=[spec])
    def serve(images):
        # The signature wrapper checks the dtype but not the shape: check it here, at run time.
        images = tf.ensure_shape(images, spec.shape, name="check_images_shape")
        logits = small(images, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    return serve


def _write_saved_model(small, path):
    archive = keras.export.ExportArchive()
    archive.track(small)
    archive.add_endpoint(SIGNATURE, serving_signature(small))
    archive.write_out(path, verbose=False)


def _self_check(model, small):
    """Max |logits difference| on uniform random images; refuses to export a wrong model."""
    shape = (_CHECK_EXAMPLES,) + tuple(small.input_shape[1:])
    x = tf.random.stateless_uniform(shape, seed=(0, 0))
    if hasattr(model, "inference_logits"):
        expected = model.inference_logits(x)
    else:
        out = model(x, training=False)
        expected = out["logits"] if isinstance(out, dict) else out
    diff = float(np.max(np.abs(np.asarray(expected) - np.asarray(small(x, training=False)))))
    if not diff <= _CHECK_TOLERANCE:
        raise RuntimeError(f"the compact model differs from the masked one by {diff:.3g} (a bug): not exported.")
    return diff


def _dir_bytes(path, skip=()):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path) for name in names
        if os.path.relpath(os.path.join(root, name), path) not in skip
    )


def _report(model, small, version, source_path, staging, notes, max_diff):
    before = complexity(getattr(model, "backbone", model))
    widths = {
        row.name: {"before": row.units_out[0], "after": row.units_out[1]}
        for row in before.layers if row.class_name.endswith(("Conv2D", "Dense"))  # InputConv2D, SameConv2D too
    }
    files = {
        "saved_model_bytes": _dir_bytes(staging, skip=(KERAS_FILE, REPORT_FILE)),
        "keras_bytes": os.path.getsize(os.path.join(staging, KERAS_FILE)),
    }
    if source_path is not None:
        files["source_bytes"] = os.path.getsize(source_path)
    classes = int(small.output_shape[-1])
    method = getattr(model, "method", None)
    return {
        "version": int(version),
        "source": source_path,
        "model": getattr(model, "backbone", model).name,
        "method": getattr(method, "name", None),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "anp_vs_tf": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "notes": notes,
        "signature": {
            "name": SIGNATURE,
            "inputs": {"images": {"dtype": "float32", "shape": [None] + list(small.input_shape[1:])}},
            "outputs": {name: {"dtype": "float32", "shape": [None, classes]}
                        for name in ("logits", "probabilities")},
        },
        "widths": widths,
        "params": {"before": before.params_dense, "after": before.params_kept},
        "flops": {"before": before.flops_dense, "after": before.flops_kept,
                  "speedup": round(before.flops_speedup, 4)},
        "units_pruned_pct": round(before.sparsity_pct, 2),
        "files": files,
        "check": {"max_abs_logit_diff": max_diff, "inputs": f"{_CHECK_EXAMPLES} uniform random images"},
    }


def _summary(target, report):
    changed = ", ".join(f"{name} {w['before']}->{w['after']}" for name, w in report["widths"].items()
                        if w["before"] != w["after"]) or "none"
    return (
        f"exported {report['model']} to {target} (signature {SIGNATURE}); widths changed: {changed}; "
        f"params {report['params']['before']:,} -> {report['params']['after']:,}, "
        f"FLOPs {report['flops']['before']:,} -> {report['flops']['after']:,} "
        f"({report['flops']['speedup']:.2f}x)"
    )
