"""The README's quickstart end to end (slow: about 7 minutes on 2 cores; run with -m slow)."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_meets_the_issue_targets(tmp_path, data_dir):
    out = tmp_path / "quickstart"
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "anp_vs_tf.main", "--flagfile=configs/quickstart.cfg", f"--out_dir={out}"],
        cwd=REPO, env={**os.environ, "ANP_VS_DATA_DIR": str(data_dir)},
        capture_output=True, text=True, timeout=1200,
    )
    wall = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    base = json.loads((out / "base" / "metrics.json").read_text())
    assert metrics["num_examples"] == 10_000 and metrics["eval_attack"]["steps"] == 40
    assert metrics["clean_acc"] >= 0.98
    assert metrics["pgd_acc"] >= 0.80
    assert metrics["sparsity_pct"] >= 25
    assert metrics["vulnerability_wb"] < base["vulnerability_wb"]
    assert wall < 600, f"quickstart took {wall:.0f} s"
