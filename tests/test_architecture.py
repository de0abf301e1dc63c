"""The package's module graph: no cycles, and no import from a lower layer to a higher one."""

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fine-tune" / "baichuan_finetune"

# Lowest first. A module may import modules of its own layer or of lower layers only.
LAYERS = [
    # Self-contained: copied next to saved weights, so they may import nothing of the package but each other.
    # specs_baichuan: the model's facts (shapes, layer names, ids, position schemes), standard library only.
    {"configuration_baichuan", "tokenization_baichuan", "modeling_baichuan", "specs_baichuan"},
    # quiet (library noise filters), launch_checks (fine-tune.py's checks before torch), errors (the error
    # kinds and their exit codes), json_files (the one "JSON object or why not" reader): stdlib only.
    {"quiet", "launch_checks", "errors", "json_files"},
    {"losses", "quantize", "attention"},
    # Which files hold a directory's weights, each checked whole (no torch): preflight, saving, tools.
    {"weight_files"},
    {"records", "encoding", "collator", "data_stats"},
    # preference_data: pair records, their encoding and batches (uses preprocess.split_sizes).
    {"preprocess", "preference_data"},
    # plan: the memory planner reads config.json only; train and scripts/plan.py import it.
    {"data_preview", "arguments", "plan"},
    # launch_guard (rank <-> launcher) and fingerprint (base recorded in adapters): train imports them.
    {"lora", "trainer", "saving", "preflight", "launch_guard", "fingerprint", "preference", "preemption",
     "checkpoint_trust", "resume_checks"},
    {"train"},
    {"loading", "convert", "openai_requests"},
    {"generation"},
    {"chat_cli", "serve", "evaluate", "merge"},
    {"tiny"},
    # The console command `baichuan-finetune` (the subpackage cli/, one node here): entry points only.
    {"cli"},
]
SELF_CONTAINED = LAYERS[0]


def package_imports(path: Path) -> set[str]:
    """Names of the package modules that ``path`` imports (relative or absolute, at any depth)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and not module.startswith("baichuan_finetune"):
                continue
            parts = module.split(".")[1:] if node.level == 0 else module.split(".") if module else []
            if parts:
                found.add(parts[0])
            else:  # "from . import x" / "from baichuan_finetune import x"
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "baichuan_finetune" and len(parts) > 1:
                    found.add(parts[1])
    return found


def subpackage_imports(path: Path) -> set[str]:
    """Names of the package modules that a module of a subpackage (cli/) imports: ``from ..x``,
    ``from .. import x`` or ``baichuan_finetune.x`` (``from .y``, the subpackage's own, is not counted)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("baichuan_finetune."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("baichuan_finetune.") and len(a.name.split(".")) > 1)
    return found


def module_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__"}
    subpackages = {p.parent.name: p.parent for p in PACKAGE_DIR.glob("*/__init__.py")}
    names = set(modules) | set(subpackages)
    graph = {name: package_imports(path) & names - {name} for name, path in modules.items()}
    for name, folder in subpackages.items():
        graph[name] = set().union(*(subpackage_imports(f) for f in folder.rglob("*.py"))) & names - {name}
    return graph


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"module {name!r} is in no layer of {__file__}: add it where it belongs")


def test_every_module_has_a_layer():
    for name in module_graph():
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
        for name, deps in module_graph().items()
        for dep in deps
        if layer_of(dep) > layer_of(name)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = module_graph()
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            pytest.fail("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_self_contained_modules_import_only_each_other():
    for name in SELF_CONTAINED:
        deps = module_graph()[name]
        assert deps <= SELF_CONTAINED, f"{name} imports {deps - SELF_CONTAINED}"
        tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_text(encoding="utf-8"))
        absolute = [
            node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("baichuan_finetune")
        ]
        # Saved directories load these files as a dynamic module where the package may be absent.
        assert not absolute, f"{name} imports {absolute} by the package's name"


def test_the_checker_sees_real_imports():
    # Guards the checks above against passing because the parser found nothing.
    graph = module_graph()
    assert "tokenization_baichuan" in graph["encoding"]
    assert "preprocess" in graph["data_preview"]
    assert "errors" in graph["arguments"]
    assert "train" in graph["cli"]
