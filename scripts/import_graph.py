"""Print the import graph between brainscan's own modules, and check that it points one way.

    python scripts/import_graph.py            # the graph, its layers, loops and function-level imports
    python scripts/import_graph.py --check    # exit 1 when a rule below is broken (tests/code/test_import_graph.py)
    python scripts/import_graph.py --map      # the module map of docs/internals.md (Markdown)
    python scripts/import_graph.py --root DIR # another checkout, e.g. `git worktree add DIR <commit>` of an older one

Each top-level folder is one import package and one layer (dependencies point down only):
    tools        scripts/, benchmarks/
    cli          cli/
    wiring       pipelines/, serving/
    steps        components/
    local        brainscan/local/ (the one-machine stack)
    core         brainscan/
No module imports tests/. No import loops between modules. No project code edits `sys.path`
(scripts import the installed package). An import inside a function needs a comment saying why
(on its line, or in the comment lines directly above the block of imports it belongs to):
TensorFlow's start-up cost is a fine reason. The bodies of KFP components (`@dsl.component`) are
exempt: KFP ships only the function's source, so their imports must live inside.

Standard library only, and nothing of the project is imported: the source is read as text.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level folders: each is the import package of the same name
PACKAGES = ("brainscan", "components", "pipelines", "serving", "cli", "scripts", "benchmarks")
# a module's layer: the longest matching package prefix
LAYER_OF_PACKAGE = {"brainscan": "core", "brainscan.local": "local", "components": "steps", "pipelines": "wiring",
                    "serving": "wiring", "cli": "cli", "scripts": "tools", "benchmarks": "tools"}
LAYERS = {"core": 0, "local": 1, "steps": 2, "wiring": 3, "cli": 4, "tools": 5}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported project module
    line: int
    in_function: bool
    explained: bool  # a comment says why (only asked of function-level imports)


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            modules[".".join(p for p in rel.parts if p != "__init__")] = path
    return modules


def layer_of(module: str) -> str:
    prefix = module
    while prefix not in LAYER_OF_PACKAGE:
        prefix = prefix.rpartition(".")[0]
    return LAYER_OF_PACKAGE[prefix]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (the longest known prefix), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _commented(lines: list[str], node: ast.stmt) -> bool:
    """A comment on the import's own line(s), or in the comment lines directly above its block of imports."""
    end = getattr(node, "end_lineno", node.lineno)
    if any("#" in lines[i - 1] for i in range(node.lineno, end + 1)):
        return True
    i = node.lineno - 1
    while i >= 1:
        text = lines[i - 1].strip()
        if text.startswith("#"):
            return True
        if not text or text.startswith(("import ", "from ")):  # the block, its groups split by blank lines
            i -= 1
            continue
        if text.endswith(",") or text.endswith("(") or text.startswith(")"):  # inside a multi-line import
            i -= 1
            continue
        return False
    return False


def _is_mutated(tree: ast.AST, target: ast.Attribute) -> bool:
    """`sys.path` called with a changing method (insert, append, extend ...) or assigned."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.value is target \
                and node.func.attr in ("insert", "append", "extend", "remove", "pop", "clear"):
            return True
        if isinstance(node, ast.Assign) and any(t is target for t in node.targets):
            return True
        if isinstance(node, ast.AugAssign) and node.target is target:
            return True
    return False


def _is_kfp_component(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    for decorator in decorators:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target) in ("dsl.component", "component", "kfp.dsl.component"):
            return True
    return False


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> tuple[list[Import], list[tuple[int, str]]]:
    """(project imports, unexplained function-level imports of anything) of one module."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    unexplained: list[tuple[int, str]] = []
    path_edits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                  and isinstance(node.value, ast.Name) and node.value.id == "sys"
                  and _is_mutated(tree, node)]
    for line in path_edits:
        unexplained.append((line, "edits sys.path: " + lines[line - 1].strip()))

    def visit(node: ast.AST, in_function: bool, in_component: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            component = in_component or _is_kfp_component(child)
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:
                    base = child.module or ""
                    if child.level:
                        base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1]
                                        + ([base] if base else []))
                    names = [f"{base}.{a.name}" for a in child.names] or [base]
                explained = _commented(lines, child) or in_component if in_function else True
                if in_function and not explained:
                    unexplained.append((child.lineno, lines[child.lineno - 1].strip()))
                for name in names:
                    target = _resolve(name, modules)
                    if target is None and name.startswith("tests"):
                        target = "tests"
                    if target and target != module:
                        found.append(Import(module, target, child.lineno, in_function, explained))
            visit(child, inside, component)

    visit(tree, False)
    return found, unexplained


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the import loops (components of more than one module)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def analyse() -> dict:
    modules = module_files()
    edges: list[Import] = []
    unexplained: dict[str, list[tuple[int, str]]] = {}
    for module, path in modules.items():
        found, loose = imports_of(module, path, modules)
        edges += found
        if loose:
            unexplained[module] = loose
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        if edge.target != "tests":
            graph[edge.source].add(edge.target)
    violations = []
    for edge in edges:
        if edge.target == "tests":
            violations.append(f"{edge.source}:{edge.line} imports tests (project code never depends on tests)")
            continue
        src, dst = layer_of(edge.source), layer_of(edge.target)
        if LAYERS[dst] > LAYERS[src]:
            violations.append(f"{edge.source}:{edge.line} ({src}) imports {edge.target} ({dst}): points up")
    return {"modules": modules, "edges": edges, "graph": graph, "loops": strongly_connected(graph),
            "violations": violations, "unexplained": unexplained}


def _summary(path: Path) -> str:
    """The first sentence-line of a module's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def module_map() -> str:
    """Every project module by layer: its file and the first line of its docstring (Markdown)."""
    modules = module_files()
    out = ["| layer | module | what it is |", "|---|---|---|"]
    for layer in sorted(LAYERS, key=LAYERS.get):
        for module, path in modules.items():
            if layer_of(module) == layer:
                out.append(f"| {layer} | `{path.relative_to(ROOT).as_posix()}` | {_summary(path).replace('|', '/')} |")
    return "\n".join(out) + "\n"


DOC = ROOT / "docs" / "internals.md"
MAP_START, MAP_END = "<!-- module map: python scripts/import_graph.py --map -->", "<!-- end of module map -->"


def with_module_map(doc: str) -> str:
    """`doc` with the text between the module-map markers replaced by the current map."""
    head, _, rest = doc.partition(MAP_START + "\n")
    _, _, tail = rest.partition(MAP_END)
    if not tail and MAP_END not in rest:
        raise ValueError(f"the module-map markers are missing from {DOC}")
    return f"{head}{MAP_START}\n{module_map()}{MAP_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a rule is broken")
    parser.add_argument("--map", action="store_true", help="print the module map (docs/internals.md) and exit")
    parser.add_argument("--write-map", action="store_true", help="write the module map into docs/internals.md")
    parser.add_argument("--root", type=Path, help="the checkout to read (default: this one)")
    args = parser.parse_args(argv)
    if args.root:
        global ROOT
        ROOT = args.root.resolve()
    if args.map:
        print(module_map(), end="")
        return 0
    if args.write_map:
        DOC.write_text(with_module_map(DOC.read_text()))
        return 0
    result = analyse()
    edges = [e for e in result["edges"] if e.target != "tests"]
    by_source: dict[str, list[Import]] = defaultdict(list)
    for edge in edges:
        by_source[edge.source].append(edge)
    print("# imports between project modules (* = inside a function)")
    for layer in sorted(LAYERS, key=LAYERS.get, reverse=True):
        members = [m for m in result["modules"] if layer_of(m) == layer]
        print(f"\n[{layer}]")
        for module in members:
            targets = sorted({(e.target, e.in_function) for e in by_source.get(module, [])})
            shown = ", ".join(t + ("*" if f else "") for t, f in targets) or "-"
            print(f"  {module} -> {shown}")
    in_function = sum(e.in_function for e in edges)
    print(f"\n{len(edges)} imports between project modules, {in_function} of them inside functions")
    print(f"import loops: {len(result['loops'])}")
    for loop in result["loops"]:
        print("  " + " <-> ".join(loop))
    print(f"imports pointing up a layer: {len(result['violations'])}")
    for line in result["violations"]:
        print("  " + line)
    loose = sum(len(v) for v in result["unexplained"].values())
    print(f"function-level imports without a comment saying why, and sys.path edits: {loose}")
    for module, items in result["unexplained"].items():
        for line, text in items:
            print(f"  {module}:{line}: {text}")
    broken = result["loops"] or result["violations"] or loose
    return 1 if (args.check and broken) else 0


if __name__ == "__main__":
    sys.exit(main())
