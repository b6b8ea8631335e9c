"""The package's shape (docs/architecture.md): short modules, and imports that only go down the
layers. Imports are read with ``ast`` from the source, so nothing here imports the package."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 500

# The layers, lowest first: a module may import from its own layer and the ones before it.
LAYERS: dict[str, tuple[str, ...]] = {
    "kernels": ("dino_fast.kernels",),
    # How errors reach the user and optional packages are imported: every layer may use them.
    "foundation": ("dino_fast.errors", "dino_fast.optional"),
    "ops": ("dino_fast.ops", "dino_fast._C"),
    # Drop-in loss modules for other codebases, on the ops.
    "drop-ins": ("dino_fast.dinov2", "dino_fast.lightly_adapter"),
    "models": ("dino_fast.models",),
    "data": ("dino_fast.data",),
    "shared helpers": (
        "dino_fast.checkpoint",
        "dino_fast.distributed",
        "dino_fast.flags",
        "dino_fast.output_lock",
        "dino_fast.watchdog",
    ),
    "train and eval": ("dino_fast.train", "dino_fast.eval", "dino_fast.visualize"),
}
# Outside the stack: the official code, which must stay independent of what it is compared with;
# the package root, whose __init__ only names the public API (imported lazily).
OFFICIAL = "dino_fast.official"
ROOT = "dino_fast"
NEVER_IMPORTED_BY_THE_PACKAGE = ("tests", "benchmarks")

# A size that predates this test, to be removed from here when it is split (the test fails on
# a stale entry). New oversized modules fail at once.
KNOWN_OVERSIZED = {
    "kernels/dino_loss.py": "forward and backward kernels in one module",
}


def package_files() -> dict[str, Path]:
    """Module name -> source file for every module of the installed package (kernels/ is
    installed as dino_fast.kernels)."""
    files = {}
    for folder, package in ((REPO / "dino_fast", "dino_fast"), (REPO / "kernels", "dino_fast.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


MODULES = package_files()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    relative: bool = False

    def __str__(self) -> str:
        path = MODULES[self.importer].relative_to(REPO)
        return f"{path}:{self.line} imports {self.imported}"


def imports_of(module: str) -> list[Import]:
    """Every module ``module`` imports, at any depth of its code: ``from a import b`` counts as
    ``a.b`` when that is a module, relative imports resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                name = f"{base}.{alias.name}"
                imported = name if name in MODULES else base
                found.append(Import(module, imported, node.lineno, relative=node.level > 0))
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer in LAYERS (its longest matching prefix); None outside it."""
    best = None
    for index, prefixes in enumerate(LAYERS.values()):
        for prefix in prefixes:
            if within(module, prefix) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    return None if best is None else best[0]


def rule_broken(imp: Import) -> str | None:
    """Why ``imp`` is not allowed, or None."""
    importer, imported = imp.importer, imp.imported
    if imported.split(".")[0] in NEVER_IMPORTED_BY_THE_PACKAGE:
        return "the package never imports tests/ or benchmarks/"
    if not within(imported, ROOT):
        return None  # torch, numpy, the standard library, ...
    if within(importer, OFFICIAL) and not within(imported, OFFICIAL):
        return f"{OFFICIAL} imports nothing else of dino_fast"
    if within(imported, OFFICIAL) and not within(importer, OFFICIAL):
        return f"only tests and benchmarks use {OFFICIAL}"
    if within(importer, "dino_fast.kernels"):
        # Copied into another codebase, kernels/ must work without dino_fast: relative imports only.
        if imp.relative and within(imported, "dino_fast.kernels"):
            return None
        return "kernels/ imports nothing from dino_fast (its own modules relatively)"
    low, high = layer_of(imported), layer_of(importer)
    if low is None or high is None:
        return None  # the package root: the lazy public API
    if low > high:
        names = list(LAYERS)
        return f"the {names[high]} layer may not import the higher {names[low]} layer"
    return None


def test_the_rule_table_names_every_module() -> None:
    unplaced = [m for m in MODULES if m != ROOT and layer_of(m) is None and not within(m, OFFICIAL)]
    assert not unplaced, f"modules in no layer of LAYERS (add them to the table): {unplaced}"


def test_no_module_is_longer_than_500_lines() -> None:
    files = [*MODULES.values(), *sorted((REPO / "benchmarks").rglob("*.py"))]
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in files}
    oversized = {p: n for p, n in lengths.items() if n > MAX_LINES}
    new = {p: n for p, n in oversized.items() if p not in KNOWN_OVERSIZED}
    assert not new, f"modules over {MAX_LINES} lines (split them by concept): {new}"
    stale = sorted(set(KNOWN_OVERSIZED) - set(oversized))
    assert not stale, f"no longer over {MAX_LINES} lines: remove them from KNOWN_OVERSIZED: {stale}"


def test_imports_go_down_the_layers() -> None:
    broken = {}
    for module in MODULES:
        for imp in imports_of(module):
            reason = rule_broken(imp)
            if reason is not None:
                broken[str(imp)] = reason
    assert not broken, "imports against the layers:\n" + "\n".join(f"  {k}: {v}" for k, v in broken.items())


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("dino_fast.models.vit", "dino_fast.ops.loss", True),
        ("dino_fast.ops.loss", "dino_fast.models.vit", False),
        ("dino_fast.data.batch", "dino_fast.train", False),
        ("dino_fast.eval.knn", "dino_fast.data.folders", True),
        ("dino_fast.official.training", "dino_fast.models.init", False),
        ("dino_fast.official.training", "dino_fast.official.loss", True),
        ("dino_fast.train", "dino_fast.official.training", False),
        ("dino_fast.eval.knn", "benchmarks.timing", False),
        ("dino_fast.kernels.ema", "dino_fast.kernels.runtime", False),
        ("dino_fast.ops.ema", "torch", True),
    ],
)
def test_the_rules_catch_what_they_should(importer: str, imported: str, allowed: bool) -> None:
    assert (rule_broken(Import(importer, imported, 1)) is None) == allowed


def test_kernels_import_their_own_modules_relatively() -> None:
    ok = Import("dino_fast.kernels.ema", "dino_fast.kernels.runtime", 1, relative=True)
    assert rule_broken(ok) is None
