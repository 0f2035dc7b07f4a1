"""The package's architecture, checked: every import points down a layer (or stays in its own
sub-package), and no module imports another's private name."""

from __future__ import annotations

import ast
from pathlib import Path

import cosim_dask

PACKAGE = Path(cosim_dask.__file__).parent

#: Bottom to top: a module may import from its own layer and the layers below.
LAYERS = [
    {"errors", "objectstore", "outputs"},
    {"core"},
    {"data"},
    {"dist"},
    {"dashboard"},
    {"fit"},
    {"transform", "estimator", "report"},
    {"cli"},
    {"console", "__init__", "__main__"},
]


def layer_of(part: str) -> int:
    return next(k for k, names in enumerate(LAYERS) if part in names)


def imports(path: Path):
    """``(line, module, names)`` of every ``from cosim_dask... import ...`` in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] == "cosim_dask":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cosim_dask":
                    yield node.lineno, alias.name, []


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield path, rel.parts


def test_imports_point_down():
    upward = []
    for path, parts in modules():
        here = layer_of(parts[0])
        for line, module, names in imports(path):
            target = module.split(".")[1:]
            if not target:  # `from cosim_dask import X`: only the version, read at any layer
                if names != ["__version__"] and here < layer_of("__init__"):
                    upward.append(f"{'/'.join(parts)}:{line} imports {names} from cosim_dask")
                continue
            if layer_of(target[0]) > here:
                upward.append(f"{'/'.join(parts)}:{line} imports {module}")
    assert upward == []


def test_no_private_names_cross_modules():
    private = []
    for path, parts in modules():
        own = "cosim_dask." + ".".join(p for p in parts if p != "__init__")
        for line, module, names in imports(path):
            if module == own:
                continue
            bad = [n for n in names if n.startswith("_") and n != "__version__"]
            hidden = [p for p in module.split(".")[1:] if p.startswith("_")]
            if bad or hidden:
                private.append(f"{'/'.join(parts)}:{line} imports {bad or module}")
    assert private == []
