"""The unit counts README.md states for LeNet-5-Caffe, against the model the zoo builds.

README.md gives the prunable units of `models.lenet5_caffe(prunable=True)` as a sum,
one term per mask layer in network order ("20 + 50 + 800 + 500 = 1,370 prunable units"),
quotes the total elsewhere ("1370 prunable units") and the flattened features the mask
before dense1 covers ("the 800 flattened inputs"). Each is checked here against the units
of the model's BetaBernoulliDropout layers, so the text cannot drift from the code.
"""

import pathlib
import re

import keras

from anp_vs_tf import models
from anp_vs_tf.layers.beta_bernoulli import beta_bernoulli_layers
from anp_vs_tf.models.graph import producer

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NUMBER = r"\d[\d,]*"


def _int(text):
    return int(text.replace(",", ""))


def _text():
    return " ".join(README.read_text(encoding="utf-8").split())  # sentences may wrap lines


def _mask_units():
    """(name, units) of each mask layer of the prunable LeNet-5-Caffe, in network order."""
    return [(layer.name, layer.units) for layer in beta_bernoulli_layers(models.lenet5_caffe(prunable=True))]


def test_the_per_layer_sum_matches_the_mask_layers():
    sums = re.findall(rf"({NUMBER}(?:\s*\+\s*{NUMBER})+)\s*=\s*({NUMBER}) prunable units", _text())
    assert sums, "README.md no longer states the prunable units as 'a + b + ... = total prunable units'"
    units = _mask_units()
    for terms, total in sums:
        stated = [_int(t) for t in terms.split("+")]
        assert stated == [n for _, n in units], f"README says {terms}; the mask layers have {units}"
        assert sum(stated) == _int(total), f"README's sum {terms} is not {total}"


def test_every_stated_total_is_the_models():
    totals = [_int(t) for t in re.findall(rf"({NUMBER}) prunable units", _text())]
    assert totals, "README.md no longer states the number of prunable units"
    units = _mask_units()
    assert set(totals) == {sum(n for _, n in units)}, f"README says {totals} prunable units; the masks have {units}"


def test_the_flattened_features_are_masked_as_stated():
    model = models.lenet5_caffe(prunable=True)
    after_flatten = [
        layer.units for layer in beta_bernoulli_layers(model)
        if isinstance(producer(layer.input).layer, keras.layers.Flatten)
    ]
    assert len(after_flatten) == 1, "the prunable LeNet-5-Caffe has no single mask on its Flatten"
    stated = [_int(n) for n in re.findall(rf"({NUMBER}) flattened", _text())]
    assert stated, "README.md no longer says how many flattened features are masked"
    assert set(stated) == set(after_flatten), f"README says {stated} flattened; the mask has {after_flatten}"
