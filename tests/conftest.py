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
