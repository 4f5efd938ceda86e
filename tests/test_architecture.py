"""The floors of docs/architecture.md, checked on the source: no module of gigatrain imports
from a higher floor than its own. A module may import its own package, anything on a lower
floor, and the few neighbours on its own floor listed in SAME_FLOOR. Imports inside functions
and under TYPE_CHECKING count too: a late import hides an arrow, it does not remove it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gigatrain"

# Each module belongs to the longest of these names that prefixes it (gigatrain.plan.app.cli
# is the plan application, gigatrain.plan.costs the plan library).
FLOORS = {
    "gigatrain": 0,  # the package's own __init__: a docstring, nothing to import
    "gigatrain.models": 0,  # model, presets, flops, the loss
    "gigatrain.paths": 0,
    "gigatrain.ranks": 0,  # rank and world size, readable without a process group
    "gigatrain.config": 1,
    "gigatrain.data": 2,
    "gigatrain.checkpoint": 2,
    "gigatrain.rundir": 2,
    "gigatrain.plan": 3,  # the library: catalog, cost model, layout search, reliability, power, units
    "gigatrain.metrics": 3,
    "gigatrain.fault": 3,
    "gigatrain.parallel": 4,
    "gigatrain.train": 5,
    "gigatrain.interop": 6,  # Hugging Face export and import: reads runs and checkpoints, writes both
    "gigatrain.plan.app": 6,  # the application: plan CLI, report tables, sweep, calibrate, published runs
    "gigatrain.launch": 6,
    "gigatrain.usage": 6,  # the command lines' shared parser
    "gigatrain.cli": 6,
    "gigatrain.__main__": 6,
}

# Arrows allowed between different rooms of one floor; any other is a cycle waiting to happen
# (fault/ and metrics/ imported each other through goodput).
SAME_FLOOR = {
    "gigatrain.rundir": {"gigatrain.data"},  # the run's tokenizer file name
    "gigatrain.metrics": {"gigatrain.plan"},  # MFU's peak FLOPs, goodput's closed form
    "gigatrain.plan.app": {"gigatrain.usage"},
    "gigatrain.cli": {"gigatrain.plan.app", "gigatrain.launch", "gigatrain.usage", "gigatrain.interop"},
    "gigatrain.__main__": {"gigatrain.cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str | None:
    """The FLOORS entry that `module` belongs to (None: not placed)."""
    candidates = [name for name in FLOORS if module == name or (name != "gigatrain" and module.startswith(name + "."))]
    return max(candidates, key=len, default=None)


def imported(tree: ast.AST) -> set[str]:
    """The gigatrain modules a module imports (`from gigatrain import x` imports gigatrain.x)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "gigatrain":
                names |= {f"gigatrain.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    return {name for name in names if name == "gigatrain" or name.startswith("gigatrain.")}


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_floor():
    assert [module for module in MODULES if room(module) is None] == []


def test_the_table_names_modules_that_exist():
    """A misspelt room would place nothing: each entry is, or prefixes, a module."""
    missing = [name for name in FLOORS if not any(room(m) == name for m in MODULES)]
    assert missing == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_stay_on_their_floor_or_below(module):
    own = room(module)
    upward = []
    for target in sorted(imported(ast.parse(MODULES[module].read_text()))):
        other = room(target)
        if other == own:
            continue  # its own room (plan.app is a room of its own: the plan library may not import it)
        beside = other is not None and FLOORS[other] == FLOORS[own] and other in SAME_FLOOR.get(own, set())
        if other is None or FLOORS[other] >= FLOORS[own] and not beside:
            upward.append(f"{module} (floor {FLOORS[own]}) imports {target} (floor {FLOORS.get(other)})")
    assert not upward, "arrows up the floors (docs/architecture.md):\n" + "\n".join(upward)
