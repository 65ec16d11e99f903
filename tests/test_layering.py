"""The import graph runs one way: methods -> plan -> backends -> patch -> families -> loading -> preflight ->
the verbs (eval, tune, finetune) -> the command line and the package root.

Parses ctxpatch's imports with `ast` (nothing is executed) and fails when a module imports one of
a higher layer (at any depth: a function-level import is an arrow too), or when imports form a cycle
anywhere (function-level imports and annotation-only imports under TYPE_CHECKING included: a cycle hidden
inside a function is still one). `errors`, the other small foundations and the compatibility boundary
`_compat` sit beneath everything. The verbs share a layer; between them only the cycle test applies.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ctxpatch"

# (layer, module prefixes), lowest first; a module belongs to the last layer one of whose prefixes it has
LAYERS = [
    (
        "foundation",
        ("ctxpatch.errors", "ctxpatch._compat", "ctxpatch._version", "ctxpatch.lengths", "ctxpatch.dtypes",
         "ctxpatch.jsonlog"),
    ),
    (
        "methods",
        (
            "ctxpatch.registry", "ctxpatch.masking", "ctxpatch.kinds", "ctxpatch.rotary", "ctxpatch.masks",
            "ctxpatch.biases", "ctxpatch.scales", "ctxpatch.positions", "ctxpatch.caches", "ctxpatch.spec",
        ),
    ),
    ("plan", ("ctxpatch.plan", "ctxpatch.compose")),
    ("backends", ("ctxpatch.backends",)),
    ("patch", ("ctxpatch.record", "ctxpatch.adapters", "ctxpatch.patch")),
    ("families", ("ctxpatch.chatglm",)),  # checkpoints read without their remote code
    ("loading", ("ctxpatch.loading",)),
    ("preflight", ("ctxpatch.preflight",)),
    ("verbs", ("ctxpatch.eval", "ctxpatch.tune", "ctxpatch.finetune")),
]
APPLICATIONS = len(LAYERS)  # everything else: ctxpatch itself, cli, cli_methods, docs, __main__


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    if module.endswith(".__main__"):
        return APPLICATIONS  # `python -m ctxpatch.VERB`: an entry point, as the command line is
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return APPLICATIONS


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(
    module: str, path: Path, known: dict[str, Path], annotations: bool = False
) -> list[tuple[str, int, bool]]:
    """(imported ctxpatch module, line, at module level) for every import of `module` (with `annotations`, those
    under `if TYPE_CHECKING:` too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not annotations:
                continue  # annotations only: no arrow at run time
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, top) for a in child.names if a.name.split(".")[0] == "ctxpatch")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                if source.split(".")[0] != "ctxpatch":
                    continue
                for alias in child.names:  # `from . import x` names a submodule when there is one
                    sub = f"{source}.{alias.name}"
                    out.append((sub if sub in known else source, child.lineno, top))
            deeper = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            visit(child, deeper)

    visit(tree, True)
    return out


def test_no_module_imports_a_higher_layer():
    known = modules()
    upward = []
    for module, path in known.items():
        for target, line, _ in imports(module, path, known):
            if layer_of(target) > layer_of(module):
                names = [n for n, _ in LAYERS] + ["applications"]
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({names[layer_of(module)]}) imports "
                    f"{target} ({names[layer_of(target)]})"
                )
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def import_graph() -> dict[str, set[str]]:
    """module -> the ctxpatch modules it imports, at any depth, annotation-only imports included."""
    known = modules()
    return {m: {t for t, _, _ in imports(m, p, known, annotations=True) if t in known and t != m}
            for m, p in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_anywhere():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_hidden_in_a_function_is_found():
    """The check itself: a function-level import that closes a loop is a cycle."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    graph = import_graph()
    graph["ctxpatch.errors"] = graph["ctxpatch.errors"] | {"ctxpatch.patch"}  # as if errors imported patch
    assert find_cycle(graph) is not None


def test_the_applications_are_layered():
    """loading < preflight < eval / tune / finetune < the command line."""
    order = ["ctxpatch.chatglm.convert", "ctxpatch.loading.base", "ctxpatch.preflight", "ctxpatch.eval.cli",
             "ctxpatch.tune.cli", "ctxpatch.finetune.cli", "ctxpatch.cli"]
    layers = [layer_of(m) for m in order]
    assert layers[:3] == sorted(set(layers[:3])) and len(set(layers[3:6])) == 1 and layers[2] < layers[3] < layers[6]


def test_the_layers_cover_the_core():
    """Every module of the engine has a layer below the applications (a new core module gets one)."""
    core = ("ctxpatch.plan", "ctxpatch.compose", "ctxpatch.masking", "ctxpatch.backends.blockwise", "ctxpatch.patch")
    assert [layer_of(m) for m in core] == [2, 2, 1, 3, 4]
    assert set(modules()) >= set(core)
