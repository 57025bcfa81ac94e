"""The package's layers (issue 25): each imports only the layers below it (and ``errors`` and
``config``), no two modules import each other at load time, and a module over 400 lines says in
its docstring why it is one module. Read from the source, so a wrong import fails here before it
fails a user."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nemocc_dask"
BASE = ("errors", "config")  # importable from every layer
LAYERS = ("io", "recipe", "llm", "serve", "run")  # bottom to top
TOP = ("__init__", "cli")  # the public API and the command line: anything
# the mock server: for users' tests and the CLI's serve-mock; below run, imported by no layer
TESTING_RANK = LAYERS.index("llm")
LONG_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py") if "data" not in p.parts}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _rank(module: str) -> float:
    layer = _layer(module)
    if layer in BASE:
        return -1
    if layer in LAYERS:
        return LAYERS.index(layer)
    if layer == "testing":
        return TESTING_RANK + 0.5
    return len(LAYERS)  # the top level


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The package modules ``path`` imports (``pkg.mod`` without ``nemocc_dask.``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("nemocc_dask"):
            base = node.module[len("nemocc_dask"):].lstrip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}".lstrip(".") if not base else base)
        elif isinstance(node, ast.Import):
            found |= {a.name[len("nemocc_dask."):] for a in node.names
                      if a.name.startswith("nemocc_dask.")}
    return {name for name in found if name}


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, path in _modules().items():
        if _layer(module) in TOP:
            continue
        for imported in _imports(path):
            if _layer(imported) == "testing" and _layer(module) != "testing":
                wrong.append(f"{module} imports the mock server ({imported})")
            elif _rank(imported) > _rank(module):
                wrong.append(f"{module} ({_layer(module)}) imports {imported} "
                             f"({_layer(imported)}), a layer above it")
    assert not wrong, "\n".join(wrong)


def test_no_two_modules_import_each_other_when_loaded():
    modules = _modules()
    graph = {m: {i if i in modules else i.rsplit(".", 1)[0] for i in _imports(p, True)}
             for m, p in modules.items()}
    for module, deps in graph.items():
        for dep in deps:
            if dep != module and module in graph.get(dep, ()) and not dep.endswith("__init__"):
                assert False, f"{module} and {dep} import each other"


def test_a_long_module_says_why_it_is_one():
    unexplained = []
    for module, path in _modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > LONG_MODULE_LINES and "One module because" not in doc:
            unexplained.append(f"{module}: {lines} lines")
    assert not unexplained, unexplained


def _third_party_imports(path: Path) -> set[str]:
    """The top-level names of the packages ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_llm_layer_touches_dask_in_its_adapters_only_and_never_pandas():
    """llm/ talks to endpoints: Dask only in its two adapters (the scheduler's budget plugin,
    the worker's pools plugin), no pandas at all."""
    adapters = {"llm.budget", "llm.pool_plugin"}
    found = {name: _third_party_imports(path) for name, path in _modules().items()
             if _layer(name) == "llm"}
    dask_users = {name for name, names in found.items() if names & {"dask", "distributed"}}
    assert dask_users <= adapters, dask_users - adapters
    assert not [name for name, names in found.items() if "pandas" in names]
