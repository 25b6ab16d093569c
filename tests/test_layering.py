"""The import layering of docs/architecture.md, enforced on the source.

Every ``import`` in every module of ``fewbit/`` (top-level and inside functions) is parsed;
an import of another fewbit module must go to the same or a lower layer. The exceptions are
listed with their reason; a new upward import fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fewbit"

#: Module-name prefix -> layer (lower layers may not import higher ones). Longest prefix wins.
LAYERS: dict[str, int] = {
    "fewbit.util": 0,
    "fewbit.models": 0,
    "fewbit.approx": 1,
    "fewbit.codecs": 2,
    "fewbit.kernels": 3,
    "fewbit.functional": 4,
    "fewbit.compress": 4,
    "fewbit.checkpoint": 4,
    "fewbit.modules": 5,
    "fewbit.configs": 6,
    "fewbit.handlers": 6,
    "fewbit.apply": 6,
    "fewbit.convert": 6,
    "fewbit.levels": 6,
    "fewbit.integrations": 6,
    "fewbit.prototype": 6,
    "fewbit.profile": 7,
    "fewbit.bench": 7,
    "fewbit.cli": 7,
    "fewbit.__main__": 7,
    "fewbit": 8,  # the package itself re-exports everything
}

#: (importer, imported) pairs allowed upward, with the reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("fewbit.approx.store", "fewbit.codecs.bitpack"):
        "argument check (check_bits) shared with the codecs",
}

#: (importer package, imported package) allowed upward inside function bodies only.
LAZY: dict[tuple[str, str], str] = {
    ("fewbit.codecs", "fewbit.kernels"):
        "a codec dispatches to its own Triton kernel on CUDA, imported when first used",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def _lazy_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside function bodies."""
    lazy: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lazy.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return lazy


def _imports(path: Path, eager_only: bool = False) -> set[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    lazy = _lazy_nodes(tree)
    for node in ast.walk(tree):
        if eager_only and id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fewbit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fewbit"):
                continue
            # ``from . import x`` imports submodules: count each as its own import.
            subs = [f"{target}.{a.name}" for a in node.names
                    if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(
                        ".py").exists()
                    or (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).is_dir()]
            found.update(subs or [target])
    return found


def test_every_module_has_a_layer() -> None:
    for path in ROOT.rglob("*.py"):
        assert _layer(_module_name(path)) >= 0


def _lazy_allowed(name: str, target: str) -> bool:
    return any(name.startswith(a + ".") and target.startswith(b + ".") for a, b in LAZY)


def test_imports_go_down_the_layers() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        if name == "fewbit":
            continue
        eager = _imports(path, eager_only=True)
        for target in sorted(_imports(path)):
            if _violates(name, target, target in eager):
                upward.append(f"{name} (layer {_layer(name)}) imports {target} "
                              f"(layer {_layer(target)})")
    assert upward == []


def _violates(name: str, target: str, eager: bool) -> bool:
    if name == target or name.startswith(target + "."):
        return False  # a package's own __init__ (parents are imported first anyway)
    if not eager and _lazy_allowed(name, target):
        return False
    return _layer(target) > _layer(name) and (name, target) not in EXCEPTIONS


def test_the_rule_itself() -> None:
    assert _violates("fewbit.codecs.quantize", "fewbit.modules.linear", eager=False)
    assert _violates("fewbit.modules.linear", "fewbit.apply", eager=True)
    assert _violates("fewbit.codecs.quantize", "fewbit.kernels.quantize", eager=True)
    assert not _violates("fewbit.codecs.quantize", "fewbit.kernels.quantize", eager=False)
    assert not _violates("fewbit.handlers.compress", "fewbit.modules.compressed", eager=True)
    assert not _violates("fewbit.bench.configs", "fewbit.apply", eager=True)


def test_exceptions_are_still_needed() -> None:
    for importer, imported in EXCEPTIONS:
        path = ROOT.parent / (importer.replace(".", "/") + ".py")
        assert imported in _imports(path), (importer, imported)
