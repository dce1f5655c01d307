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
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def package_imports(source: str, module: str) -> set[str]:
    """The run-time imports of ``module`` that are modules of ``efficient_attn`` (they name one of its files)."""
    modules = set()
    for name in runtime_imports(source, module):
        if name == "efficient_attn" or not name.startswith("efficient_attn."):
            continue
        relative = Path(*name.split(".")[1:])
        if (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists():
            modules.add(name)
    return modules


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
        "efficient_attn.harness",
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
