"""The house's layout, checked: every module of src/ptqlab belongs to a wing of the code map (README, "Development"),
and imports only from wings below its own or from its own wing, without cycles. A module placed nowhere, or an
import that runs upward (a measurement module reaching into the CLI, the engine into recipes), fails here with the
edge named. Imports inside functions count (they still make the lower module depend on the upper one); imports
under `if TYPE_CHECKING:` do not."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

WINGS: list[tuple[str, tuple[str, ...]]] = [
    # (wing, modules or packages in it), lowest first; a wing may import from the wings above it in this list.
    ("foundation", ("ptqlab.version", "ptqlab.errors", "ptqlab.settings", "ptqlab.schemes", "ptqlab.progress",
                    "ptqlab.triton_support", "ptqlab.record", "ptqlab.output", "ptqlab.embedded", "ptqlab.data",
                    "ptqlab.safetensors_files", "ptqlab.families", "ptqlab.models", "ptqlab.formats.validate")),
    ("quant", ("ptqlab.quant",)),
    ("engine", ("ptqlab.engine",)),
    ("runtime", ("ptqlab.runtime",)),
    ("recipes", ("ptqlab.recipes",)),
    ("measure", ("ptqlab.measure",)),
    ("assembly", ("ptqlab.pipeline", "ptqlab.formats.compressed_tensors", "ptqlab.formats.readback",
                  "ptqlab.formats.gguf_file", "ptqlab.formats.gguf_tokenizer")),
    ("verbs", ("ptqlab.api", "ptqlab.report", "ptqlab.plots", "ptqlab.export_gguf")),
    ("suite", ("ptqlab.suite",)),
    ("interface", ("ptqlab.cli", "ptqlab")),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "ptqlab").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def wing_of(module: str) -> int | None:
    """The index in WINGS of the most specific entry naming `module` or a package above it."""
    best = None
    for index, (_, members) in enumerate(WINGS):
        for member in members:
            if module == member or module.startswith(member + "."):
                if best is None or len(member) > len(best[1]):
                    best = (index, member)
    return None if best is None else best[0]


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The ptqlab modules `path` imports (a `from package import module` counts as the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(node) for branch in ast.walk(tree)
                 if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                 for node in ast.walk(branch)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
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


def test_imports_have_no_cycles():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
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
    assert cycles == []


@pytest.mark.parametrize("source, expected", [
    ("from ptqlab.cli import app\n", {"ptqlab.cli"}),
    ("from ptqlab.runtime import kernels\n", {"ptqlab.runtime.kernels"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ptqlab.suite import lab\n", set()),
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
