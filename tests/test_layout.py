"""The tree shows the architecture: scripts at the root, the library in folders named for their stage, imports that
run one way (scripts -> the two root modules and the folders; a folder never imports a script; no circles)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("reading", "running", "embedding", "measuring")
ROOT_MODULES = {"model", "stft_dataset"}  # the two modules the design names; the other root files are scripts
MAX_ROOT_FILES, MAX_FOLDER_MODULES, MAX_FUNCTION_LINES, MAX_TRAIN_LINES = 12, 10, 60, 500


def project_modules():
    """{dotted module name: path} of the root files and the folders' modules (tests excluded)."""
    modules = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for folder in FOLDERS:
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py") and name != "__init__.py":
                modules[f"{folder}.{name[:-3]}"] = os.path.join(ROOT, folder, name)
    return modules


def imported(path, modules):
    """Project modules that the file at `path` imports anywhere in it (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def import_graph():
    modules = project_modules()
    return {name: imported(path, modules) - {name} for name, path in modules.items()}


def scripts():
    return {name for name in project_modules() if "." not in name} - ROOT_MODULES


def test_the_graph_sees_the_imports_of_every_form():
    graph = import_graph()
    assert "reading.waveforms" in graph["reading.recordings"]  # from reading.waveforms import ...
    assert "embedding.vector_index" in graph["similar"]  # from embedding import vector_index
    assert {"train", "embed", "inference", "similar"} <= graph["test_pipeline"]  # import train


def test_root_holds_scripts_and_the_two_modules_and_folders_hold_at_most_ten():
    assert len([name for name in os.listdir(ROOT) if name.endswith(".py")]) <= MAX_ROOT_FILES
    for folder in FOLDERS:
        names = [name for name in os.listdir(os.path.join(ROOT, folder)) if name.endswith(".py")]
        assert "__init__.py" in names and len(names) - 1 <= MAX_FOLDER_MODULES, folder


def test_no_folder_imports_a_script_and_no_script_imports_another():
    graph, entry_points = import_graph(), scripts()
    for name, targets in graph.items():
        if "." in name:
            assert not targets & entry_points, f"{name} imports the script(s) {targets & entry_points}"
        elif name != "test_pipeline":  # the smoke test runs the scripts' main()
            assert not targets & entry_points, f"{name} imports the script(s) {targets & entry_points}"


def find_circle(graph):
    """One import circle of the graph as a list of modules (first == last), or None."""
    state = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return [*path, name, target]
            found = None if target in state else visit(target, [*path, name])
            if found:
                return found
        state[name] = "done"
        return None

    for name in sorted(graph):
        found = None if name in state else visit(name, [])
        if found:
            return found[found.index(found[-1]) :]
    return None


def test_imports_form_no_circle():
    assert find_circle(import_graph()) is None


def longest_functions(paths):
    """(lines, 'path:function') of every function of the files, longest first."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{os.path.relpath(path, ROOT)}:{node.name}"))
    return sorted(found, reverse=True)


def test_functions_are_short_and_train_py_fits_a_sitting():
    tests = [
        os.path.join(ROOT, "tests", name) for name in os.listdir(os.path.join(ROOT, "tests")) if name[-3:] == ".py"
    ]
    longest = longest_functions([*project_modules().values(), *tests])
    assert longest[0][0] <= MAX_FUNCTION_LINES, longest[:3]
    assert len(open(os.path.join(ROOT, "train.py")).read().splitlines()) <= MAX_TRAIN_LINES


def test_a_circle_or_a_long_function_would_be_found(tmp_path):
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    path = tmp_path / "long.py"
    path.write_text("def f():\n" + "    x = 1\n" * 70)
    assert longest_functions([str(path)])[0] == (71, os.path.relpath(str(path), ROOT) + ":f")
