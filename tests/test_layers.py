"""The shape of ``shared/``: layers that import only downwards, no cycles, short
modules, and command lines that hold no logic of their own.

Every import counts, also one inside a function: a lazy import is still a
dependency, and a cycle through it is still a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from shared.data import REPO_ROOT

PACKAGE = REPO_ROOT / "shared"
MAX_LINES = 450

# lowest first; a module may import modules of its own layer or below, never above
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("shared", "mode", "data", "device", "plotting", "cleaning")),
    ("data and tokenizer", ("tokenizer", "dataset", "tasks")),
    (
        "model",
        (
            "attention",
            "flash_attention",
            "recompute",
            "cross_entropy",
            "model",
            "gpt2_weights",
            "flops",
        ),
    ),
    (
        "training",
        (
            "precision",
            "loss_scaling",
            "loss",
            "checkpoint",
            "train",
            "activation_memory",
            "memory_profile",
            "memory",
            "distributed",
        ),
    ),
    ("post-training", ("lora", "sft", "dpo", "chat", "grpo")),
    ("generation", ("generation", "quantize")),
    ("evaluation", ("evaluation",)),
    (
        "course models",
        ("recipes", "pretrained", "model_spec", "llama_export", "hf_export", "gguf"),
    ),
    (
        "command lines and server",
        ("openai_api", "server", "generate", "serve", "evaluate", "export"),
    ),
]
# ``python -m shared.<verb>``: argument parsing and calls, nothing else
COMMAND_LINES = ("generate", "serve", "evaluate", "export")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer index of ``shared.x.y`` (a package's modules share its layer)."""
    top = "shared" if module == "shared" else module.split(".")[1]
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(module)


def imports_of(module: str) -> set[str]:
    """The ``shared`` modules ``module`` imports anywhere in its file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from shared import tasks`` imports the module shared.tasks
            targets = [source] + [f"{source}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    unplaced = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def test_imports_only_go_down():
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in GRAPH.items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    # the check above is only as good as this function
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_short(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it by concern"


@pytest.mark.parametrize("verb", COMMAND_LINES)
def test_command_lines_hold_no_logic(verb):
    tree = ast.parse(MODULES[f"shared.{verb}"].read_text())
    defined = [
        n.name
        for n in tree.body
        if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
    ]
    assert defined == ["main"], f"shared.{verb} defines {defined}: move logic below"


def test_library_modules_have_no_main():
    for module, path in MODULES.items():
        if module.split(".")[-1] in COMMAND_LINES and module.count(".") == 1:
            continue
        source = path.read_text()
        assert "def main(" not in source, f"{module}: a main() belongs in a CLI"
        assert "__main__" not in source, f"{module}: a __main__ belongs in a CLI"


def test_loading_a_course_model_loads_no_training_or_evaluation():
    code = (
        "import sys, shared.pretrained; "
        "print(' '.join(m for m in sys.modules if m.startswith('shared')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "shared.pretrained" in out
    # below the model layer, plus the safe weight loader; LoRA only for an adapter
    allowed = {"shared.checkpoint", "shared.pretrained"}
    above = [m for m in out if layer_of(m) > layer_of("shared.model")]
    assert set(above) <= allowed, f"importing shared.pretrained loaded {above}"
    assert "shared.tasks" not in out and "shared.train" not in out
