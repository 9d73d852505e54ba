"""Training under tf.distribute gives the single-device loss curve (same seed, same global batch)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HELPER = pathlib.Path(__file__).with_name("distributed_losses.py")
METHODS = ("anp_vs", "at")


def run_helper(out, runs, data_dir, env=None, timeout=600):
    environment = {**os.environ, "ANP_VS_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(out), *runs], env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(process, timeout=600):
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("one") / "losses.json"
    finish(run_helper(out, [f"one:{m}" for m in METHODS], data_dir))
    return json.loads(out.read_text())


def assert_same_curve(reference, result, method):
    expected = np.array(reference[f"one:{method}"]["losses"])
    got = np.array(result["losses"])
    assert len(expected) == len(got) == 20
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_mirrored_over_two_cpu_devices_matches_one_device(single_device, tmp_path, data_dir):
    out = tmp_path / "mirrored.json"
    finish(run_helper(out, [f"mirrored:{m}" for m in METHODS], data_dir))
    result = json.loads(out.read_text())
    for method in METHODS:
        assert result[f"mirrored:{method}"]["replicas"] == 2
        assert_same_curve(single_device, result[f"mirrored:{method}"], method)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_multi_worker_with_two_processes_matches_one_device(single_device, tmp_path, data_dir):
    workers = [f"localhost:{free_port()}" for _ in range(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(run_helper(
            tmp_path / f"worker{index}.json", [f"multi_worker:{m}" for m in METHODS], data_dir,
            env={"TF_CONFIG": json.dumps(tf_config)},
        ))
    for process in processes:
        finish(process)
    result = json.loads((tmp_path / "worker0.json").read_text())  # the chief writes
    assert not (tmp_path / "worker1.json").exists()
    for method in METHODS:
        assert result[f"multi_worker:{method}"]["replicas"] == 2
        assert_same_curve(single_device, result[f"multi_worker:{method}"], method)


CHECK = """
import json, os
from anp_vs_tf import distribute
strategy = distribute.make_strategy("multi_worker")
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
with strategy.scope():
    distribute.check_same_on_every_worker(7, "the step", "fix it")
    try:
        distribute.check_same_on_every_worker(30 * index, "the step", "fix it")
    except ValueError as error:
        print("refused:", error)
"""


def test_workers_that_would_resume_from_different_steps_all_refuse(tmp_path):
    """A worker that cannot see the chief's checkpoints would start over: every worker stops."""
    workers = [f"localhost:{free_port()}" for _ in range(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "3"}
        processes.append(subprocess.Popen([sys.executable, "-c", CHECK], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for index, process in enumerate(processes):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        assert stdout.count("refused:") == 1 and f"here {30 * index}" in stdout, stdout
