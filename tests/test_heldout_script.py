"""benchmarks/heldout.py refuses bad input in one line before any data is read or work
is done, and an override keeps its setting's type."""

import importlib.util
import pathlib
import types

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "heldout.py"


class _Stop(Exception):
    pass


@pytest.fixture()
def heldout(monkeypatch):
    spec = importlib.util.spec_from_file_location("heldout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = {}

    def load(*args, **kwargs):
        seen["loaded"] = True
        return types.SimpleNamespace(info=None)

    def build(config, info, init_from=None):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr(module.data, "load", load)
    monkeypatch.setattr(module.building, "build", build)
    module.seen = seen
    return module


@pytest.mark.parametrize("args, message", [
    (["--set", "lamda_vs=3"], "lamda_vs is not a RunConfig setting"),
    (["--set", "lambda_vs=abc"], "expects name=number"),
    (["--init_from", "/nonexistent/model.keras"], "train the base first"),
    (["--method", "anp-vs"], "invalid choice: 'anp-vs'"),
    (["--heldout", "0"], "--heldout must be at least 1"),
])
def test_bad_arguments_stop_before_any_data_is_read(heldout, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        heldout.main(["--method", "anp_vs", "--out_dir", str(tmp_path / "run")] + args)
    assert message in capsys.readouterr().err
    assert "loaded" not in heldout.seen


def test_an_existing_result_is_not_overwritten(heldout, tmp_path, capsys):
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(SystemExit):
        heldout.main(["--method", "at", "--out_dir", str(tmp_path)])
    assert "already holds a result.json" in capsys.readouterr().err
    assert (tmp_path / "result.json").read_text() == "{}"


def test_overrides_reach_the_config_with_their_settings_types(heldout, tmp_path):
    with pytest.raises(_Stop):
        heldout.main(["--method", "anp_vs", "--out_dir", str(tmp_path / "run"),
                      "--set", "lambda_vs=3", "--set", "pgd_steps=5"])
    config = heldout.seen["config"]
    assert (config.method, config.validation_examples) == ("anp_vs", 5000)
    assert config.lambda_vs == 3.0 and isinstance(config.lambda_vs, float)
    assert config.pgd_steps == 5 and isinstance(config.pgd_steps, int)
    assert config.beta_kl == 4.0  # the table's setting, not overridden
