"""The package layout: the library never imports the runner layer; the runner's packages import in one
direction (cli -> reports/studies -> execute -> interop -> store -> experiment -> library); no import cycle
between the runner's modules; no private name (``_x``) imported from another module.

Every import counts, including those inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import php_runner

PACKAGE = Path(php_runner.__file__).resolve().parent
LIBRARY = ("model", "data", "engine")
# The floor of each top-level part of php_runner; a module may import its own floor or lower ones.
FLOORS = {"errors": -1, "files": 0, "model": 1, "data": 1, "engine": 1, "experiment": 2, "experiments": 2,
          "store": 3, "interop": 4, "execute": 5, "studies": 6, "reports": 6, "cli": 7, "__main__": 8}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported php_runner module, names) for every import in ``path``, module-level or not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("php_runner"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                target = submodule if (PACKAGE.parent / submodule.replace(".", "/")).with_suffix(".py").exists() \
                    or (PACKAGE.parent / submodule.replace(".", "/") / "__init__.py").exists() else node.module
                found.append((node.lineno, target, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.startswith("php_runner")]
    return found


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if "migrations/versions" not in str(path)}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def runner_layer(module: str) -> bool:
    return part(module) not in ("", *LIBRARY, "errors", "files")


def test_the_library_never_imports_the_runner_layer():
    wrong = [f"{name}:{line} imports {target}" for name, path in modules().items() if part(name) in LIBRARY
             for line, target, _ in imports_of(path) if runner_layer(target)]
    assert wrong == []


def test_imports_go_one_way_between_the_runner_packages():
    wrong = []
    for name, path in modules().items():
        if not part(name):
            continue
        for line, target, _ in imports_of(path):
            if not part(target) or part(target) == part(name) or {part(target), part(name)} <= set(LIBRARY):
                continue
            if FLOORS[part(target)] >= FLOORS[part(name)]:
                wrong.append(f"{name}:{line} imports {target} (floor {FLOORS[part(target)]} >= {FLOORS[part(name)]})")
    assert wrong == []


def test_no_import_cycle_between_modules_of_the_runner_layer():
    graph = {name: {target for _, target, _ in imports_of(path) if runner_layer(target) and target != name}
             for name, path in modules().items() if runner_layer(name)}
    # A package's __init__ imports its submodules (cli registers its commands): not a dependency back.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "closed"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    wrong = [f"{name}:{line} imports {names[0]} from {target}" for name, path in modules().items()
             for line, target, names in imports_of(path) if names and names[0].startswith("_") and target != name]
    assert wrong == []
