"""The code's shape: the library package under the scripts, and no module that imports one that
imports it back, directly or through others."""

import ast
import os

from conftest import REPO

PACKAGE = "cnn_compression"


def imports_of(path):
    """Module names the file at `path` imports anywhere (top level or inside functions); a package
    module counts by its dotted name (`from cnn_compression import data` -> 'cnn_compression.data')."""
    with open(path) as handle:
        tree = ast.parse(handle.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_modules(folder):
    """{module name: file} for the top-level modules of `folder` and those of its package."""
    modules = {name[:-3]: os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".py")}
    package = os.path.join(folder, PACKAGE)
    if os.path.isdir(package):
        modules.update({f"{PACKAGE}.{name[:-3]}": os.path.join(package, name)
                        for name in os.listdir(package) if name.endswith(".py") and name != "__init__.py"})
    return modules


def import_graph(folder):
    modules = project_modules(folder)
    return {module: (imports_of(path) & set(modules)) - {module} for module, path in modules.items()}


def import_circles(folder):
    """Every import circle among the project's modules in `folder`, as lists of module names."""
    graph = import_graph(folder)
    circles, finished = [], set()

    def visit(module, path):
        for imported in sorted(graph[module]):
            if imported in path:
                circles.append(path[path.index(imported):] + [imported])
            elif imported not in finished:
                visit(imported, path + [imported])
        finished.add(module)

    for module in sorted(graph):
        if module not in finished:
            visit(module, [module])
    return circles


def test_no_module_imports_one_that_imports_it_back():
    circles = import_circles(REPO)
    assert not circles, "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)


def test_the_library_never_imports_the_modules_above_it():
    graph = import_graph(REPO)
    upward = {module: sorted(imported for imported in targets if not imported.startswith(PACKAGE + "."))
              for module, targets in graph.items() if module.startswith(PACKAGE + ".")}
    assert not {module: targets for module, targets in upward.items() if targets}


def test_no_test_or_benchmark_edits_sys_path():
    """The package and the stage modules are installed (editable), so nothing needs sys.path."""
    offenders = []
    for folder in ("tests", "benchmarks"):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith(".py"):
                with open(os.path.join(REPO, folder, name)) as handle:
                    if "sys.path.insert" in handle.read().replace('"sys.path.insert"', ""):
                        offenders.append(f"{folder}/{name}")
    assert not offenders


def test_the_checks_find_circles_and_upward_imports(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")  # inside a function counts too
    (tmp_path / "c.py").write_text("import os\nimport a\n")
    (tmp_path / "d.py").write_text(f"from {PACKAGE} import low\n")
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "low.py").write_text(f"from {PACKAGE}.lower import y\n")
    (tmp_path / PACKAGE / "lower.py").write_text("def g():\n    import d\n")
    assert import_circles(str(tmp_path)) == [["a", "b", "c", "a"],
                                             [f"{PACKAGE}.low", f"{PACKAGE}.lower", "d", f"{PACKAGE}.low"]]
    assert import_graph(str(tmp_path))[f"{PACKAGE}.lower"] == {"d"}


def test_every_stage_script_sets_the_library_up():
    """cnn_compression.setup() (the fused BatchNorm) is an explicit call in each script's main, not a
    side effect: a script that forgets it trains on Keras' slower BatchNorm without any error."""
    scripts = [name for name in sorted(os.listdir(REPO)) if name.endswith(".py")
               and "cli.run(main)" in open(os.path.join(REPO, name)).read()]
    assert len(scripts) >= 6
    for name in scripts:
        tree = ast.parse(open(os.path.join(REPO, name)).read())
        main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
        calls = {ast.unparse(node.func) for node in ast.walk(main) if isinstance(node, ast.Call)}
        assert "cnn_compression.setup" in calls, f"{name}: main() never calls cnn_compression.setup()"


def test_an_install_elsewhere_carries_every_module_and_the_tested_dependencies():
    """`pip install <repository>` installs what pyproject.toml lists: every top-level module (a
    module left out installs cleanly and fails at its first import), the package, and the runtime
    dependencies requirements.txt pins, each at the tested version as its floor."""
    import re
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    setup = project["tool"]["setuptools"]
    top_level = {name[:-3] for name in os.listdir(REPO) if name.endswith(".py")}
    assert set(setup["py-modules"]) == top_level
    assert setup["packages"] == [PACKAGE]  # no subpackage that the list would leave out
    assert not [name for name in os.listdir(os.path.join(REPO, PACKAGE))
                if os.path.isfile(os.path.join(REPO, PACKAGE, name, "__init__.py"))]

    def requirements(lines):
        """{name: version} of requirement lines (`name==1.2.0` or `name>=1.2`; comments dropped)."""
        found = {}
        for line in lines:
            match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(==|>=)\s*([0-9.]+)\s*(#.*)?", line)
            if match:
                found[match.group(1).lower()] = match.group(3)
        return found

    with open(os.path.join(REPO, "requirements.txt")) as handle:
        pinned = requirements(handle.read().splitlines())
    declared = requirements(project["project"]["dependencies"] + project["project"]["optional-dependencies"]["tensorboard"])
    assert set(declared) == set(pinned)
    for name, version in pinned.items():  # tensorflow==2.21.0 is declared >= 2.21
        assert version.startswith(declared[name]), name
