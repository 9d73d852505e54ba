"""The notebooks run end to end on real data, with small settings swapped into their top cell."""

import json
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
# Run in this order: 02 and 03 analyse the models 01 saves (02 trains its AT model itself).
SMALL = {
    "01_quickstart.ipynb": dict(TRAIN_SUBSET=1000, TEST_SUBSET=200, BASE_EPOCHS=1, ANP_VS_EPOCHS=1,
                                TRAIN_PGD_STEPS=2, TRAIN_STEP_SIZE=0.15, EVAL_PGD_STEPS=5),
    "02_vulnerability_analysis.ipynb": dict(TRAIN_SUBSET=1000, TRAIN_EPOCHS=1, TRAIN_PGD_STEPS=2,
                                            EXAMPLES=200, EVAL_PGD_STEPS=5),
    "03_compact_export.ipynb": dict(REPEATS=3),
}


def parameters_cell(book):
    cells = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "each notebook has exactly one cell tagged 'parameters'"
    return cells[0]


def with_small_settings(book, settings):
    """Append the small settings to the parameters cell: it still defines everything else."""
    cell = parameters_cell(book)
    cell.source += "\n# --- test settings ---\n" + "\n".join(f"{k} = {v!r}" for k, v in settings.items())
    return book


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebooks_are_committed_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} has outputs"
    source = parameters_cell(book).source
    for key in SMALL[name]:
        assert f"{key} = " in source, f"{name}: the test overrides {key}, which the notebook does not set"


def test_the_three_notebooks_run_in_order(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("ANP_VS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in sorted(SMALL):
        book = with_small_settings(nbformat.read(NOTEBOOKS / name, as_version=4), SMALL[name])
        NotebookClient(book, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
                  if o.get("output_type") == "error"]
        assert not errors, json.dumps(errors)[:2000]
    runs = tmp_path / "runs" / "notebooks"
    for figure in ("active_units.png", "feature_vulnerability.png", "first_layer.png",
                   "surface_anp_vs.png", "saliency_at.png"):
        assert (runs / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert (runs / "export" / "anp_vs" / "1" / "saved_model.pb").exists()
