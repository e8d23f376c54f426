"""The package's architecture, checked on the source: layers, no import cycles, no hidden lazy imports, sizes.

Layers, bottom to top (a module imports only its own layer or lower ones, and never in a cycle)::

    0  audex, vocab, tokenizer, audio, tasks, prompts,     the paper's vocabulary, prompts and task list
       tool_calls, voice_prompt
    1  modules/ parts/ data/ parallel/                     model parts, stateless helpers, the data pipeline, scale-out
    2  models/ parallel/planner                            AudexModel: assembly, forward, steps, checkpoints; layouts
    3  training/ inference/                                orchestration of a stage; generation
    4  eval/ export/ serving/                              benchmarks; offline export; online serving
    5  cli/                                                the command-line entry points
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "audex"

LAYERS = {
    0: ("audex", "audex.vocab", "audex.tokenizer", "audex.audio", "audex.tasks", "audex.prompts", "audex.tool_calls",
        "audex.voice_prompt"),
    1: ("audex.modules", "audex.parts", "audex.data", "audex.parallel"),
    2: ("audex.models", "audex.parallel.planner"),
    3: ("audex.training", "audex.inference"),
    4: ("audex.eval", "audex.export", "audex.serving"),
    5: ("audex.cli",),
}
#: optional heavy dependencies that may be imported inside a function: GPU stacks and Triton's own modules (absent on
#: most hosts), the ONNX runtime, the eval metrics' optional models (openl3 needs TensorFlow, unbabel-comet needs
#: transformers < 5: neither installs beside Audex), matplotlib (plots only), NeMo in the import hook (start-up cost)
LAZY_ALLOWED = ("tensorrt_llm", "onnxruntime", "onnx", "tritonclient", "triton_python_backend_utils",
                "c_python_backend_utils", "megatron", "transformer_engine", "nemo.core.classes", "openl3", "comet",
                "matplotlib")
#: files allowed over the size limit, each with the reason in its own docstring
MAX_LINES = 420


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(name: str) -> int:
    best, rank = -1, None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), layer
    if rank is None:
        raise AssertionError(f"{name} is in no layer: add its folder to LAYERS in tests/test_layout.py")
    return rank


def resolve(name: str, known: set[str]) -> str | None:
    """The Audex module an import names (``audex.data.schema`` for ``from audex.data import schema``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, known: set[str]) -> tuple[list[tuple[str, int, bool]], list[tuple[str, int]]]:
    """Audex modules imported ``(module, line, inside_a_function)`` and external modules imported lazily."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def in_function(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return True
        return False

    ours, lazy_external = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module.startswith("audex") else [node.module]
        else:
            continue
        for name in names:
            if name == "audex" or name.startswith("audex."):
                target = resolve(name, known)
                if target is not None:
                    ours.append((target, node.lineno, in_function(node)))
            elif in_function(node):
                lazy_external.append((name, node.lineno))
    return ours, lazy_external


@pytest.fixture(scope="module")
def graph():
    mods = sources()
    known = set(mods)
    return mods, {name: imports(path, known) for name, path in mods.items()}


def test_every_module_sits_in_a_layer_and_imports_only_downward(graph):
    mods, edges = graph
    upward = []
    for name, (ours, _) in edges.items():
        for target, line, _ in ours:
            if target != name and layer_of(target) > layer_of(name):
                upward.append(f"{mods[name].relative_to(PKG.parent)}:{line} imports {target}")
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def test_no_import_cycles(graph):
    mods, edges = graph
    adjacency = {name: sorted({t for t, _, _ in ours if t != name}) for name, (ours, _) in edges.items()}
    # a package's __init__ importing its own submodules is not a cycle when the submodules do not import it back
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in adjacency.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in adjacency:
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_lazy_imports_except_optional_heavy_dependencies(graph):
    mods, edges = graph
    hidden = []
    for name, (ours, lazy_external) in edges.items():
        where = mods[name].relative_to(PKG.parent)
        hidden += [f"{where}:{line} imports {t} inside a function" for t, line, lazy in ours if lazy]
        hidden += [f"{where}:{line} imports {m} inside a function" for m, line in lazy_external
                   if not m.startswith(LAZY_ALLOWED)]
    assert not hidden, "in-function imports (move them to the module top):\n" + "\n".join(hidden)


def test_files_stay_small_unless_they_say_why():
    big = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text().count("\n")
        if lines > MAX_LINES and "reads better whole" not in path.read_text()[:3000]:
            big.append(f"{path.relative_to(PKG.parent)}: {lines} lines")
    assert not big, f"files over {MAX_LINES} lines whose docstring does not say why they stay whole:\n" + "\n".join(big)


def test_layers_as_documented():
    """The layering rules of the renovation: data/modules/parts never reach up; models never imports training."""
    assert layer_of("audex.data.sequence") < layer_of("audex.models.audex_model") < layer_of("audex.training.run")
    assert layer_of("audex.modules.packed") == layer_of("audex.parts.losses") == 1
    assert layer_of("audex.serving.requests") > layer_of("audex.inference.pipelines")
