"""The code's shape: dependencies point one way, and the registered model carries all the code it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from brainscan import pyfunc
from scripts import import_graph

ROOT = Path(__file__).resolve().parents[2]


def test_import_graph_has_no_loops_no_upward_imports_and_no_silent_lazy_imports():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
    result = import_graph.analyse()
    assert result["loops"] == [] and result["violations"] == [] and result["unexplained"] == {}


def test_the_module_map_in_the_docs_is_the_generated_one():
    """docs/internals.md carries `scripts/import_graph.py --map`'s output, not a hand-kept list."""
    doc = import_graph.DOC.read_text()
    assert import_graph.with_module_map(doc) == doc, "run: python scripts/import_graph.py --write-map"


def test_the_checker_sees_what_it_forbids(tmp_path, monkeypatch):
    """A planted loop, an upward import and an unexplained lazy import are each reported."""
    for folder in ("brainscan", "components", "pipelines", "serving", "benchmarks"):
        (tmp_path / folder).mkdir()
    (tmp_path / "brainscan" / "a.py").write_text("from brainscan import b\n")
    (tmp_path / "brainscan" / "b.py").write_text("import brainscan.a\n")
    (tmp_path / "brainscan" / "c.py").write_text("from components import step\n")
    (tmp_path / "components" / "step.py").write_text("def f():\n    import json\n    return json\n")
    (tmp_path / "pipelines" / "hack.py").write_text("import sys\nsys.path.insert(0, 'elsewhere')\n")
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    result = import_graph.analyse()
    assert result["loops"] == [["brainscan.a", "brainscan.b"]]
    assert any("brainscan.c" in v and "points up" in v for v in result["violations"])
    assert list(result["unexplained"]) == ["components.step", "pipelines.hack"]
    assert "edits sys.path" in result["unexplained"]["pipelines.hack"][0][1]


def test_the_registered_model_code_is_closed_under_its_imports():
    """What pyfunc.code_package ships is every brainscan module the pyfunc imports, nothing missing."""
    result = import_graph.analyse()
    graph = result["graph"]
    shipped = {"brainscan" if name == "__init__.py" else f"brainscan.{name[:-3]}" for name in pyfunc.SHIPPED_MODULES}
    reached, todo = set(), ["brainscan.pyfunc", "brainscan.pyfunc_entry"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph.get(module, ()))
    assert reached - {"brainscan.pyfunc_entry"} <= shipped, sorted(reached - shipped)


TENSORFLOW = ("tensorflow", "tf_keras", "tf2onnx")
ONNX_CONVERSION = ("tf2onnx", "onnx")  # registration's converter: not in the serving image


def _tensorflow_reached(start: str, packages: tuple[str, ...] = TENSORFLOW) -> tuple[set[str], list[str]]:
    """(the project modules `start` reaches by its imports, every import of `packages` among them), read with
    ast: imports at the top and inside functions alike (a lazy import still runs when its function does)."""
    import ast

    modules = import_graph.module_files()
    reached, todo, found = set(), [start], []
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        path = modules[module]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{module}:{node.lineno} imports {name}" for name in names if name.split(".")[0] in packages]
        edges, _ = import_graph.imports_of(module, path, modules)
        todo += [edge.target for edge in edges if edge.target != "tests"]
    return reached, found


def test_the_model_code_never_imports_tensorflow():
    """brainscan/network.py builds the network and the recipe under any Keras backend (a JAX machine
    trains it without TensorFlow): neither it nor a brainscan module it imports may import TensorFlow."""
    reached, found = _tensorflow_reached("brainscan.network")
    assert found == [], found
    assert {"brainscan.config", "brainscan.labels"} <= reached
    assert "brainscan.preprocessing" not in reached  # TensorFlow inside its functions
    # the check sees what it forbids: the trainer imports TensorFlow, directly and through preprocessing
    reached, found = _tensorflow_reached("components.train")
    assert any(f.startswith("components.train:") for f in found), found
    assert any(f.startswith("brainscan.preprocessing:") for f in found), found


def test_serving_never_imports_the_onnx_converter():
    """The model server only loads the model.onnx that registration converted: neither it nor anything it
    imports, at the top or inside a function, imports tf2onnx or onnx (the serving image has neither)."""
    reached, found = _tensorflow_reached("serving.server", ONNX_CONVERSION)
    assert found == [], found
    assert {"serving.model", "serving.runtime", "brainscan.modelstore"} <= reached
    # the check sees what it forbids: registration converts
    _, found = _tensorflow_reached("components.register", ONNX_CONVERSION)
    assert any(f.startswith("brainscan.onnx_export:") and f.endswith("imports tf2onnx") for f in found), found
