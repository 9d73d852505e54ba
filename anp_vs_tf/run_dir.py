"""A run's folder: refuse to overwrite results, resume an unfinished run, record settings.

    out_dir/config.json    the resolved settings, written once every check has passed
    out_dir/metrics.json   present once the run has finished: it is never overwritten
                           unless --overwrite

A run restarted with the same settings in the same folder resumes (see
`experiment.fit`); settings that change only how it runs (`_RESTART_KEYS`) may differ.
"""

import dataclasses
import json
import os

from anp_vs_tf.config import ConfigError, RunConfig
from anp_vs_tf.files import write_json

# Settings a restarted run may change (how it runs, not what it computes).
_RESTART_KEYS = ("verbose", "overwrite", "download", "strategy", "devices", "eval_batch_size",
                 "max_trials")  # a search may be resumed with more trials


def check_out_dir(config):
    """Refuse an out_dir whose results this run would overwrite; writes nothing.

    A finished run (metrics.json present) is never overwritten unless --overwrite; an
    unfinished one with the same settings resumes; different settings are refused.
    """
    out = config.out_dir
    if config.overwrite:
        return
    if os.path.exists(os.path.join(out, "metrics.json")):
        raise ConfigError(
            f"{out} already holds a finished run (metrics.json); choose another --out_dir "
            "or pass --overwrite."
        )
    saved_path = os.path.join(out, "config.json")
    if os.path.exists(saved_path):
        try:
            with open(saved_path) as f:  # settings added since that run was started take their default
                saved = _settings({**dataclasses.asdict(RunConfig()), **json.load(f)})
        except (OSError, ValueError):
            saved = None
        if saved != _settings(dataclasses.asdict(config)):
            raise ConfigError(
                f"{out} holds an unfinished run with different settings; resume it with the "
                "same flags, choose another --out_dir, or pass --overwrite."
            )


def _settings(config_dict):
    settings = {k: v for k, v in config_dict.items() if k not in _RESTART_KEYS}
    for key in ("lr_decay_at", "devices"):  # tuples come back from JSON as lists
        settings[key] = list(settings.get(key) or [])
    return settings


def prepare_out_dir(config):
    """Create out_dir and record the settings (after every check has passed)."""
    os.makedirs(config.out_dir, exist_ok=True)
    write_json(os.path.join(config.out_dir, "config.json"), dataclasses.asdict(config))
    return config.out_dir
