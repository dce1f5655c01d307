"""The harness's layering, as facts: measure/ imports nothing of the harness, harness modules import only those
below them, and building the CLI parser loads no harness, report or quality module (``efficient_attn.cli``)."""

import ast
import subprocess
import sys
from pathlib import Path

import efficient_attn

PACKAGE = Path(efficient_attn.__file__).parent
# each harness module may import only those before it in this order
HARNESS_ORDER = ["schema", "host", "runfolder", "suite", "overrides", "plan", "hf_workload", "decoding", "workloads",
                 "predict", "cell", "worker",
                 "sweep"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_measure_does_not_import_the_harness():
    for path in sorted((PACKAGE / "measure").glob("*.py")):
        bad = [m for m in imported_modules(path) if m.startswith("efficient_attn.harness")]
        assert not bad, f"{path.name} imports {bad}"


def test_harness_modules_import_downward_only():
    assert sorted(HARNESS_ORDER) == sorted(p.stem for p in (PACKAGE / "harness").glob("*.py") if p.stem != "__init__")
    for i, name in enumerate(HARNESS_ORDER):
        used = {m.split(".")[2] for m in imported_modules(PACKAGE / "harness" / f"{name}.py")
                if m.startswith("efficient_attn.harness.")}
        above = used - set(HARNESS_ORDER[:i])
        assert not above, f"harness/{name}.py imports {sorted(above)}, which come after it"


def test_building_the_parser_loads_no_harness_report_or_quality():
    code = ("import sys; from efficient_attn import cli; cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('efficient_attn.harness', 'efficient_attn.report', "
            "'efficient_attn.quality', 'pandas', 'matplotlib'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
