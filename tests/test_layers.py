"""Dependencies run one way: engine -> training -> methods -> stages -> notebooks and commands.
Every first-party import of every module (module level or inside a function) is checked."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "latentlib"

# rank of each module or package; a module may import modules of its own rank or below
RANKS = {
    "latentlib.tasks": 0, "latentlib.artifacts": 0, "latentlib.hub": 0, "latentlib.presets": 0, "latentlib.project": 0,
    "latentlib.distributed": 0,
    "latentlib.tokens": 1, "latentlib.batching": 1, "latentlib.injection": 1, "latentlib.policies": 1,
    "latentlib.deferred_grads": 1, "latentlib.recurrence": 1,
    "latentlib.evaluate": 2, "latentlib.teacher": 2, "latentlib.probes": 2, "latentlib.plots": 2,
    "latentlib.training": 3,
    "latentlib.methods": 4,
    "latentlib.stages": 5,
    "latentlib.notebook": 6, "latentlib.pipeline": 6, "latentlib.train": 6, "latentlib.report": 6,
    "latentlib.readme": 6, "latentlib": 6,
}


def _rank(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return RANKS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no layer: add it to RANKS")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latentlib"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.lineno, n if n.rsplit(".", 1)[0] != "latentlib" else n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("latentlib")]
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_it(path):
    name = _module_name(path)
    mine = _rank(name)
    above = [(line, target) for line, target in _imports(path)
             if target != "latentlib.__version__" and _rank(target) > mine]
    assert not above, f"{name} (layer {mine}) imports from above: {above}"


def _method(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "methods" else None


@pytest.mark.parametrize("path", [p for p in MODULES if "methods" in p.parts], ids=lambda p: p.name)
def test_a_method_does_not_import_another_method(path):
    mine = _method(_module_name(path))
    others = [t for _, t in _imports(path) if _method(t) not in (None, mine)]
    assert not others, f"{_module_name(path)} imports another method: {others}"


def test_the_layers_cover_every_module():
    for path in MODULES:
        _rank(_module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_name_in_all_exists(path):
    import importlib

    module = importlib.import_module(_module_name(path))
    missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert not missing, f"{module.__name__}.__all__ names what it does not define: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_all_lists_every_public_definition(path):
    import importlib

    listed = getattr(importlib.import_module(_module_name(path)), "__all__", None)
    if listed is None:
        return
    tree = ast.parse(path.read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
               and not n.name.startswith("_")]
    assert not set(defined) - set(listed), f"public but not in __all__: {sorted(set(defined) - set(listed))}"
