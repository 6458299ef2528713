"""Code identity: a digest of Python source that moves when its code does, and only then.

A module's digest hashes its syntax tree (`ast.dump`) with docstrings removed, so comments,
layout and docstrings never re-key a result. Run keys hash the harness modules that shape
results this way (harness.planner), and a method's code is the module its @method ran in
plus every module of its own package that module imports, however spelled, inside
functions too, and transitively (harness.registry.MethodInfo.code_files).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Source:
    digest: str                                               # of the syntax tree without docstrings
    imports: tuple[str, ...]                                  # `import a.b` -> 'a.b'
    from_imports: tuple[tuple[int, str | None, tuple[str, ...]], ...]  # `from ..a import b` -> (2, 'a', ('b',))


# By the bytes' sha256: parsing is what costs, and the same bytes always parse the same.
_SOURCES: dict[bytes, _Source] = {}


def _source(path: Path) -> _Source:
    data = Path(path).read_bytes()
    content = hashlib.sha256(data).digest()
    if content not in _SOURCES:
        _SOURCES[content] = _parse(data, str(path))
    return _SOURCES[content]


def _parse(data: bytes, filename: str) -> _Source:
    tree = ast.parse(data, filename=filename)
    imports, from_imports = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            from_imports.append((node.level, node.module, tuple(alias.name for alias in node.names)))
        elif isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and _has_docstring(node):
            node.body = node.body[1:]
    return _Source(hashlib.sha256(ast.dump(tree).encode()).hexdigest(), tuple(imports), tuple(from_imports))


def source_digest(path: Path) -> str:
    """Digest of a module's code: its syntax tree without docstrings."""
    return _source(path).digest


def _has_docstring(node: ast.AST) -> bool:
    first = node.body[0] if node.body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def code_digest(files: dict[str, Path], salt: str = "") -> str:
    """Digest of several modules' code, each under its name (a module name or a relative path)."""
    h = hashlib.sha256(salt.encode())
    for name in sorted(files):
        h.update(f"{name}\0{source_digest(files[name])}\0".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- imports within a package

def module_closure(module: str, path: Path) -> dict[str, Path]:
    """Module name -> file of `module` and of every module of its top-level package it imports,
    directly or through those modules: `import pkg.x`, `from pkg.x import f`, `from . import x`,
    `from .x import f`, inside functions too. A module outside any package is only itself."""
    top = module.partition(".")[0]
    out = {module: Path(path)}
    todo = [module]
    while todo:
        name = todo.pop()
        for imported in _imported_names(name, out[name]):
            if imported.partition(".")[0] != top or imported in out:
                continue
            file = _module_file(imported)
            if file is not None:
                out[imported] = file
                todo.append(imported)
    return out


def _imported_names(module: str, path: Path) -> set[str]:
    """Absolute names of every module an import statement in the file names (some may be no module)."""
    package = module if Path(path).name == "__init__.py" else module.rpartition(".")[0]
    source = _source(path)
    names = set(source.imports)
    for level, base, imported in source.from_imports:
        base = _absolute(level, base, package)
        if base is not None:
            names.add(base)
            names.update(f"{base}.{name}" for name in imported if name != "*")
    return names


def _absolute(level: int, module: str | None, package: str) -> str | None:
    if not level:
        return module
    try:
        return importlib.util.resolve_name("." * level + (module or ""), package)
    except ImportError:  # a relative import that climbs above the top package
        return None


def _module_file(name: str) -> Path | None:
    """The source file of a module of an imported package, looked up on the package's own search
    path (so a folder added to it counts) without importing it; None when `name` is no module."""
    top, *parts = name.split(".")
    dirs = [Path(d) for d in getattr(sys.modules.get(top), "__path__", None) or []]
    for i, part in enumerate(parts):
        if i == len(parts) - 1:
            module = next((d / f"{part}.py" for d in dirs if (d / f"{part}.py").is_file()), None)
            if module is not None:
                return module
        dirs = [d / part for d in dirs if (d / part / "__init__.py").is_file()]
    return dirs[0] / "__init__.py" if dirs else None
