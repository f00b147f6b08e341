"""The code's shape: no module imports one that imports it back, directly or through others."""

import ast
import os

from conftest import REPO


def imports_of(path, modules):
    """Project modules the file at `path` imports anywhere (top level or inside functions)."""
    with open(path) as handle:
        tree = ast.parse(handle.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & modules


def import_circles(folder):
    """Every import circle among the top-level modules of `folder`, as lists of module names."""
    modules = {name[:-3] for name in os.listdir(folder) if name.endswith(".py")}
    graph = {module: imports_of(os.path.join(folder, f"{module}.py"), modules) - {module} for module in modules}
    circles, finished = [], set()

    def visit(module, path):
        for imported in sorted(graph[module]):
            if imported in path:
                circles.append(path[path.index(imported):] + [imported])
            elif imported not in finished:
                visit(imported, path + [imported])
        finished.add(module)

    for module in sorted(modules):
        if module not in finished:
            visit(module, [module])
    return circles


def test_no_module_imports_one_that_imports_it_back():
    circles = import_circles(REPO)
    assert not circles, "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)


def test_the_circle_check_finds_direct_and_indirect_circles(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")  # inside a function counts too
    (tmp_path / "c.py").write_text("import os\nimport a\n")
    (tmp_path / "d.py").write_text("import a\n")
    assert import_circles(str(tmp_path)) == [["a", "b", "c", "a"]]
