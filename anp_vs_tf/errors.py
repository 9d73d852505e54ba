"""The errors a run stops with on purpose; `main` reports each in one line and an exit status.

Library code raises ValueError or TypeError; the run's orchestration (`building`,
`run_dir`, `experiment`, `tuning`) turns what the user must change into these.
"""


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line saying what to change."""


class Interrupted(RuntimeError):
    """Training stopped on request (SIGTERM) after saving a checkpoint."""


class SearchFailed(RuntimeError):
    """Every trial of a hyperparameter search failed; the message says where to look."""
