"""The package's shape, as the design card asks: one home per concept, nothing importing back up, short functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "lora_rm"
MAX_FUNCTION_LINES = 80
MAX_TRAIN_LINES = 350


def relative_imports(path: Path) -> dict[str, list[str]]:
    """Module -> the lora_rm modules it imports, each with where (top level or inside which function)."""
    found: dict[str, list[str]] = {}

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module.split(".")[0]] if child.module else [alias.name for alias in child.names]
                for name in names:
                    found.setdefault(name, []).append(where)
            visit(child, inner)

    visit(ast.parse(path.read_text()), "top level")
    return found


def test_lora_rm_has_no_import_circle():
    """Lazy imports count too; only cli.py's stay lazy (a fast --help), and a circle through them still fails."""
    graph = {path.stem: relative_imports(path) for path in PACKAGE.glob("*.py")}
    lazy = [(module, name, where) for module, imports in graph.items() if module != "cli"
            for name, places in imports.items() for where in places if where != "top level"]
    assert lazy == [], f"imports inside functions outside cli.py: {lazy}"

    def circle_from(start: str, module: str, path: list[str]) -> list[str] | None:
        for name in graph.get(module, {}):
            if name == start:
                return [*path, name]
            if name in graph and name not in path:
                found = circle_from(start, name, [*path, name])
                if found:
                    return found
        return None

    circles = [circle for module in graph if (circle := circle_from(module, module, [module]))]
    assert circles == [], f"import circles: {circles}"


def test_functions_are_short_and_train_fits_its_budget():
    long = [(path.name, node.name, node.end_lineno - node.lineno + 1) for path in sorted(PACKAGE.glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= MAX_TRAIN_LINES


def test_no_test_file_imports_another():
    """Shared helpers live in helper modules (parity.py, runs.py), never in a test_*.py."""
    importers = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            importers += [(path.name, module) for module in modules if module.split(".")[-1].startswith("test_")]
    assert importers == []
