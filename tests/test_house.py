"""The house's layout, checked: every module of src/ptqlab belongs to a wing of the code map (README, "Development"),
and imports only from wings below its own or from its own wing, without cycles, read module by module and folder by
folder (each package folder one node, each top-level module its own). A module placed nowhere, or an import that
runs upward (a measurement module reaching into the CLI, the engine into recipes), fails here with the edge named.
Imports inside functions count (they still make the lower module depend on the upper one), and so do imports under
`if TYPE_CHECKING:` (a type the lower module needs belongs at or below it). An import inside a function is there
for an optional dependency or for start-up time, and says which in a comment."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

WINGS: list[tuple[str, tuple[str, ...]]] = [
    # (wing, modules or package folders in it), lowest first; a wing may import from the wings above it in this list.
    # A package folder sits in one wing whole; a top-level module is named itself (a new one fails until placed).
    ("foundation", ("ptqlab.version", "ptqlab.errors", "ptqlab.settings", "ptqlab.schemes", "ptqlab.progress",
                    "ptqlab.triton_support", "ptqlab.record", "ptqlab.output", "ptqlab.embedded", "ptqlab.data",
                    "ptqlab.safetensors_files", "ptqlab.families", "ptqlab.models", "ptqlab.number_formats")),
    ("quant", ("ptqlab.quant",)),
    ("runtime", ("ptqlab.runtime",)),
    ("formats", ("ptqlab.formats",)),
    ("engine", ("ptqlab.engine",)),
    ("recipes", ("ptqlab.recipe", "ptqlab.recipes")),
    ("measure", ("ptqlab.measure",)),
    ("assembly", ("ptqlab.pipeline",)),
    ("verbs", ("ptqlab.options", "ptqlab.api", "ptqlab.recommend", "ptqlab.report", "ptqlab.plots", "ptqlab.export_gguf",
               "ptqlab.card")),
    ("suite", ("ptqlab.benchmark", "ptqlab.suite")),
    ("interface", ("ptqlab.cli", "ptqlab.launch", "ptqlab.__main__", "ptqlab")),
]
FOLDERS = ("ptqlab.engine", "ptqlab.formats", "ptqlab.measure", "ptqlab.quant", "ptqlab.runtime")
"""The package folders: one node each in the folder view."""


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "ptqlab").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def wing_of(module: str) -> int | None:
    """The index in WINGS of the entry naming `module`, or the package folder it is in."""
    node = folder_of(module)
    return next((index for index, (_, members) in enumerate(WINGS) if node in members), None)


def folder_of(module: str) -> str:
    """The module's node in the folder view: its package folder, or itself for a top-level module."""
    return next((folder for folder in FOLDERS if module == folder or module.startswith(folder + ".")), module)


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The ptqlab modules `path` imports, anywhere in it (a `from package import module` counts as the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ptqlab"):
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known)
            found |= submodules if len(submodules) == len(node.names) else {node.module} | submodules
    return found & set(known)


def test_every_module_has_a_wing():
    assert [name for name in modules() if wing_of(name) is None] == []


def test_no_module_imports_a_wing_above_its_own():
    known = modules()
    upward = [f"{name} ({WINGS[wing_of(name)][0]}) imports {target} ({WINGS[wing_of(target)][0]})"
              for name, path in known.items() for target in imports(path, known)
              if wing_of(target) is not None and wing_of(name) is not None and wing_of(target) > wing_of(name)]
    assert upward == []


def cycles_of(graph: dict[str, set[str]]) -> list[str]:
    """One cycle per back edge a depth-first walk meets, as `a -> b -> a`."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return cycles


def test_imports_have_no_cycles():
    known = modules()
    assert cycles_of({name: imports(path, known) - {name} for name, path in known.items()}) == []


def test_every_folder_sits_in_one_wing():
    """The folder view needs each package folder in one wing: a member naming a module inside a folder splits it."""
    split = [member for _, members in WINGS for member in members
             if any(member.startswith(folder + ".") for folder in FOLDERS)]
    assert split == []


def test_folders_import_no_wing_above_their_own_and_have_no_cycles():
    """Folder by folder: an edge between two folders runs one way only (engine -> formats and formats -> engine is a
    cycle even where no module imports its own importer)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        graph.setdefault(folder_of(name), set()).update(folder_of(t) for t in imports(path, known))
    graph = {node: targets - {node} for node, targets in graph.items()}
    upward = [f"{node} ({WINGS[wing_of(node)][0]}) imports {target} ({WINGS[wing_of(target)][0]})"
              for node, targets in graph.items() for target in sorted(targets) if wing_of(target) > wing_of(node)]
    assert upward == [] and cycles_of(graph) == []


REASONS = ("optional dependency", "start-up time")
"""What a function-local import of a ptqlab module may be for; its comment names one."""


def local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source) of every import of a ptqlab module inside a function of `path`, with the comment that covers it:
    on its line, or on the line above it or above the block of imports it belongs to."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    found = []
    for function in ast.walk(ast.parse(text)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if not any(name == "ptqlab" or name.startswith("ptqlab.") for name in names):
                continue
            above = node.lineno - 2
            while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
                above -= 1
            comment = lines[node.lineno - 1].partition("#")[2] + (lines[above] if above >= 0 else "")
            found.append((node.lineno, lines[node.lineno - 1].strip(), comment))
    return sorted(set(found))


def test_imports_inside_functions_say_why():
    """An import of ptqlab's own module inside a function hides an edge of the import graph from a reader of the
    module's head: it is there only for an optional dependency or for start-up time, and its comment says which."""
    unexplained = [f"{path.relative_to(SRC)}:{line}: {source}"
                   for name, path in sorted(modules().items()) for line, source, comment in local_imports(path)
                   if not any(reason in comment for reason in REASONS)]
    assert unexplained == []


@pytest.mark.parametrize("source, expected", [
    ("from ptqlab.cli import app\n", {"ptqlab.cli"}),
    ("from ptqlab.runtime import kernels\n", {"ptqlab.runtime.kernels"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ptqlab.suite import lab\n", {"ptqlab.suite"}),
    ("def f():\n    import ptqlab.report\n", {"ptqlab.report"}),
])
def test_the_import_reader_sees_what_python_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports(path, modules()) == expected


def test_every_module_compiles_without_warnings():
    """An invalid escape in a docstring (`\\.` outside a raw string) prints a warning on a user's first import, when
    Python compiles the module without a cached .pyc (a SyntaxWarning from 3.12, a DeprecationWarning before, which
    the test configuration ignores); compile here with every warning an error."""
    import warnings

    noisy = []
    for name, path in sorted(modules().items()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(encoding="utf-8"), str(path), "exec")
            except SyntaxError as e:  # a compile-time warning raised as an error surfaces as a SyntaxError
                noisy.append(f"{name}: {e.msg} (line {e.lineno})")
    assert noisy == []
