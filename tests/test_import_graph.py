"""The package's layering: no import cycles, the library below the command line, light imports.

The graph is read from the source (every `import` and `from ... import`, at module
level and inside functions, since an import inside a function can hide a cycle as well
as any other), so the test needs no TensorFlow and sees imports that have not run.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "anp_vs_tf"

# The run layer: settings, the run's folder, building a run, running it, the CLI.
RUN_LAYER = {"anp_vs_tf.config", "anp_vs_tf.building", "anp_vs_tf.run_dir", "anp_vs_tf.experiment",
             "anp_vs_tf.tuning", "anp_vs_tf.main"}


def _modules():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name, path, modules):
    """The package modules `name` imports (a `from pkg import mod` counts as importing mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith("anp_vs_tf"):
                continue
            while target not in modules:  # an attribute of a module: the module
                target = target.rsplit(".", 1)[0]
            if target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_graph_is_read_correctly(graph):
    """A known edge of each kind: module level, relative to a package, inside a function."""
    assert "anp_vs_tf.building" in graph["anp_vs_tf.tuning"]
    assert "anp_vs_tf.attacks.pgd" in graph["anp_vs_tf.attacks"]
    assert "anp_vs_tf.tuning" in graph["anp_vs_tf.experiment"]  # imported inside run_tune
    assert len(graph) > 40


def test_no_import_cycles(graph):
    assert _cycles(graph) == []
    # and the check itself finds one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_does_not_import_the_run_layer(graph):
    """Attacks, layers, models, trainers, metrics, export, ... raise ValueError/TypeError and
    know nothing of flags; only the run layer does (`errors` is shared by both)."""
    upward = {(module, target) for module, targets in graph.items() if module not in RUN_LAYER
              for target in targets & RUN_LAYER}
    assert upward == set()


@pytest.mark.parametrize("statement", [
    "import anp_vs_tf",
    "import anp_vs_tf.report",
    "from anp_vs_tf import report; report.main(['--help'])",
])
def test_light_imports_do_not_start_tensorflow(statement):
    script = (f"import sys\ntry:\n    {statement}\nexcept SystemExit:\n    pass\n"
              "heavy = [m for m in ('tensorflow', 'keras', 'tensorflow_probability') if m in sys.modules]\n"
              "print(heavy)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(PACKAGE))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_lazy_attributes_load_their_subpackage():
    script = ("import sys, anp_vs_tf\nassert 'anp_vs_tf.attacks' not in sys.modules\n"
              "pgd = anp_vs_tf.attacks.PGD(0.3, 0.1, 2)\nprint(type(pgd).__module__, 'tensorflow' in sys.modules)\n"
              "try:\n    anp_vs_tf.no_such_thing\nexcept AttributeError as e:\n    print('AttributeError', e)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=os.path.dirname(PACKAGE))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == "anp_vs_tf.attacks.pgd True"
    assert lines[-1].startswith("AttributeError") and "no_such_thing" in lines[-1]
