"""Install anp_vs_tf: `pip install .` (add `[test]` for the test tools)."""
import pathlib

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
VERSION = {}
exec((ROOT / "anp_vs_tf" / "version.py").read_text(), VERSION)

setup(
    name="anp_vs_tf",
    version=VERSION["__version__"],
    description=(
        "Adversarial Neural Pruning with Vulnerability Suppression (ANP-VS) "
        "for Keras 3 / TensorFlow 2"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["anp_vs_tf", "anp_vs_tf.*"]),
    install_requires=[
        "tensorflow==2.21.*",
        "tensorboard>=2.19",  # no longer pulled in by tensorflow; the runs write TensorBoard logs
        "tensorflow-probability[tf]>=0.25",
        "keras>=3.10",
        "keras-tuner>=1.4",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets imports it to download and prepare, but does not declare it.
        "importlib-resources>=6",
        "absl-py>=2.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        # nbclient + ipykernel execute the notebooks in the tests; cleverhans' PGD is the
        # reference tests/test_evaluation.py checks ours against.
        # pytest-xdist runs the tests in two processes: much of a test's time is
        # single-threaded (tracing, starting TensorFlow in a subprocess).
        # adversarial-robustness-toolbox: its AutoProjectedGradientDescent and SquareAttack
        # are the references tests/test_apgd.py and tests/test_square.py check ours against.
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "scipy>=1.10", "nbclient>=0.10",
                 "nbformat>=5.9", "ipykernel>=6.29", "cleverhans>=4.0", "adversarial-robustness-toolbox>=1.17"],
        # benchmarks/throughput.py compares with the Adversarial Robustness Toolbox.
        "benchmarks": ["adversarial-robustness-toolbox>=1.17"],
    },
    entry_points={"console_scripts": ["anp-vs-tf=anp_vs_tf.main:run"]},
)
