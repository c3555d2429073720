"""The layers of ARCHITECTURE.md, checked on the source: no module imports from a layer above its own,
MLflow only behind ``mapex_core.tracking``, Prefect only in ``flows``, no oversized module without a reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module prefix, layer): the longest matching prefix decides; a module may import its own layer or lower ones
LAYERS = [
    ("mapex_core._env", 0), ("mapex_core.errors", 0), ("mapex_core.io", 0), ("mapex_core.names", 0),
    ("mapex_core.params", 0), ("mapex_core.modalities", 0), ("mapex_core.runtime", 0), ("mapex_core.progress", 0),
    ("mapex_core.remote_errors", 0),
    ("mapex_core.model", 1), ("mapex_core.metrics", 1), ("mapex_core.tasks", 1), ("mapex_core.contract", 1),
    ("mapex_core.gate", 1),
    ("mapex_core.data", 2), ("mapex_core.pruning", 2),
    ("mapex_core.apps", 3),
    ("mapex_core.training", 4), ("mapex_core.predict", 4), ("mapex_core.export", 4),
    ("mapex_core.tracking", 5),
    ("mapex_core.project", 6), ("mapex_core.lineage", 6), ("mapex_core.stages", 6), ("mapex_core.delivery", 6),
    ("mapex_core.dashboard", 6),
    ("mapex_core.cli", 7),
    ("flows", 8),
]
MAX_LINES = 450
LONG_REASON = "Why this module is long"


def layer_of(module: str) -> int | None:
    if module == "mapex_core":  # the package itself: its __init__ only sets the quiet defaults
        return 0
    best = None
    for prefix, layer in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("mapex_core", "flows"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")[
                    : len(module.split(".")) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS (and ARCHITECTURE.md): {missing}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_from_a_layer_above_it(module: str) -> None:
    path = modules()[module]
    own = layer_of(module)
    upward = sorted(i for i in imports(path, module)
                    if i.split(".")[0] in ("mapex_core", "flows") and (layer_of(i) or 0) > own)
    assert not upward, f"{module} (layer {own}) imports {upward}"


def test_only_tracking_talks_to_mlflow_and_only_flows_to_prefect() -> None:
    for module, path in modules().items():
        roots = {i.split(".")[0] for i in imports(path, module)}
        if module.startswith("mapex_core") and not module.startswith("mapex_core.tracking"):
            assert "mlflow" not in roots, f"{module} imports mlflow (only mapex_core.tracking may)"
        if module.startswith("mapex_core"):
            assert not roots & {"prefect", "prefect_dask"}, f"{module} imports Prefect (only flows may)"


def test_the_model_knows_nothing_of_data_and_pruning_only_the_model() -> None:
    for module, path in modules().items():
        ours = {i for i in imports(path, module) if i.startswith("mapex_core.")}
        if module.startswith(("mapex_core.model", "mapex_core.pruning")):
            assert not [i for i in ours if i.startswith(("mapex_core.data", "mapex_core.training"))], module


def test_modules_are_short_or_say_why() -> None:
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES
            and LONG_REASON not in p.read_text()[:3000]}
    assert not long, f"over {MAX_LINES} lines without '{LONG_REASON}' in the module docstring: {long}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checks above are not vacuous: a data module importing the CLI is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mapex_core import cli\n    from mapex_core.stages import pretrain\n")
    found = imports(bad, "mapex_core.data.bad")
    assert {"mapex_core.cli", "mapex_core.stages"} <= found
    assert max(layer_of(i) or 0 for i in found) > layer_of("mapex_core.data.bad")
