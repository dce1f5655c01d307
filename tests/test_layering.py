"""Imports go downward only: the registry (and the leaf modules under it) import nothing from the layers above.

The registry used to import the attention package lazily while ``attention/base.py`` imported the registry, a circle
through every variant module. These tests read the modules' import statements (run-time ones: an import under
``if TYPE_CHECKING:`` is for annotations only) and check the running package too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import efficient_attn as ea

PACKAGE = Path(ea.__file__).parent
#: What each low module may import from the package at run time.
ALLOWED = {
    "errors.py": set(),
    "vocab.py": set(),
    "registry.py": {"efficient_attn.errors", "efficient_attn.vocab"},
}


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(source: str, module: str) -> set[str]:
    """Absolute module names that the source of ``module`` (e.g. ``"efficient_attn.registry"``) imports anywhere,
    functions included, except under ``if TYPE_CHECKING:``."""
    package_parts = tuple(module.split(".")[:-1])
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                parts = package_parts[: len(package_parts) - node.level + 1]
                base = ".".join(parts + ((node.module,) if node.module else ()))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule, else a name of `base`
                submodule = f"{base}.{alias.name}"
                found.add(submodule if _is_package_module(submodule) else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _is_package_module(name: str) -> bool:
    """Whether ``name`` is a module of ``efficient_attn`` below the top (it names one of its files)."""
    if not name.startswith("efficient_attn."):
        return False
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


def package_imports(source: str, module: str) -> set[str]:
    """The run-time imports of ``module`` that are modules of ``efficient_attn``."""
    return {name for name in runtime_imports(source, module) if _is_package_module(name)}


def module_imports(filename: str) -> set[str]:
    return package_imports((PACKAGE / filename).read_text(), f"efficient_attn.{filename.removesuffix('.py')}")


def test_the_import_reader_sees_lazy_and_type_checking_imports_apart():
    # the reader itself: lazy and relative imports count, one under TYPE_CHECKING does not
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from efficient_attn.model import TransformerModel\n"
        "def f():\n    import efficient_attn.attention\n    from efficient_attn import peers\n"
        "    from .harness import schema\n"
    )
    assert package_imports(source, "efficient_attn.probe") == {
        "efficient_attn.attention",
        "efficient_attn.peers",
        "efficient_attn.harness.schema",
    }


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_low_modules_import_nothing_from_above(module):
    imported = module_imports(module)
    assert imported <= ALLOWED[module], f"{module} imports {sorted(imported - ALLOWED[module])} from above it"


def test_registry_imports_no_variant_model_harness_or_report_module():
    imported = runtime_imports((PACKAGE / "registry.py").read_text(), "efficient_attn.registry")
    above = ("efficient_attn.attention", "efficient_attn.model", "efficient_attn.harness", "efficient_attn.report")
    assert not [name for name in imported if name.startswith(above)]


def test_importing_only_the_registry_lists_the_built_in_variants():
    # A fresh interpreter that imports nothing but the registry module: Python imports the package first, and its
    # __init__ registers the built-ins, so they are all listed.
    code = "import efficient_attn.registry as r; print(','.join(r.list_attentions()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    listed = result.stdout.strip().split(",")
    assert listed == ea.list_attentions()
    assert {"full", "window", "bigbird", "longformer", "linformer", "nystrom", "performer"} <= set(listed)


def test_a_registered_class_carries_its_spec():
    for key in ea.list_attentions():
        spec = ea.get_spec(key)
        assert spec.module_cls.spec is spec and spec.module_cls.spec_key == key


def test_an_unregistered_attention_class_is_refused_by_name():
    class Unregistered(ea.Attention):
        pass

    with pytest.raises(TypeError, match="Unregistered is not a registered attention"):
        Unregistered(ea.AttentionConfig(dim=8, num_heads=2))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        # a package's __init__ resolves relative imports against the package itself
        as_module = f"{name}.__init__" if path.name == "__init__.py" else name
        graph[name] = package_imports(path.read_text(), as_module)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    # Run-time imports (lazy ones inside functions included) of every module of the package form no circle.
    graph = _import_graph()
    assert "efficient_attn.registry" in graph and graph["efficient_attn.attention.base"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
