"""The package's module graph, by folder: every module lies in a layer folder, no import cycle, no
import from a lower layer to a higher one, and model/ self-contained.

The layers are the folders of the package, in the order of ``LAYERS`` in its ``__init__.py`` (lowest
first): the one hand-kept list. A module's layer is the folder it lies in.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = "baichuan_finetune"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fine-tune" / PACKAGE
SELF_CONTAINED = "model"


def read_layers() -> tuple[str, ...]:
    tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "LAYERS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{PACKAGE_DIR / '__init__.py'} defines no LAYERS")


LAYERS = read_layers()


def modules() -> dict[str, Path]:
    """Dotted name inside the package ("data.records"; a folder's __init__ is "data") -> file."""
    found = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:  # the package's own __init__ (registration, LAYERS) is not a layer
            found[".".join(parts)] = path
    return found


def package_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that module `name` (at `path`) imports, relative or absolute, at any depth."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                target = node.module.split(".")[1:]
            else:
                continue
            submodules = {".".join(target + [a.name]) for a in node.names} & known
            if submodules:  # "from . import x", "from ..checkpoints import saving"
                found |= submodules
            elif ".".join(target) in known:  # "from .records import x", "from ..model.modeling_baichuan import y"
                found.add(".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and ".".join(parts[1:]) in known:
                    found.add(".".join(parts[1:]))
    return found


def module_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: package_imports(name, path, set(mods)) - {name} for name, path in mods.items()}


def layer_of(name: str) -> int:
    folder = name.split(".")[0]
    if folder not in LAYERS:
        raise AssertionError(f"{name} lies in no folder of LAYERS {LAYERS}: move it into one, or add its folder there")
    return LAYERS.index(folder)


def by_stem() -> dict[str, str]:
    names = sorted(modules(), key=lambda name: -layer_of(name))  # a lower layer wins a shared stem
    return {name.split(".")[-1]: name for name in names}


def test_every_module_lies_in_a_layer_folder():
    for name in module_graph():
        assert "." in name or (PACKAGE_DIR / name).is_dir(), f"{name}.py lies at the package's top: move it into a folder"
        layer_of(name)
    missing = [f for f in LAYERS if not (PACKAGE_DIR / f / "__init__.py").is_file()]
    assert not missing, f"LAYERS names folders that are not packages: {missing}"


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
    graph = module_graph()
    model = {name for name in graph if name.split(".")[0] == SELF_CONTAINED}
    assert model, f"no {SELF_CONTAINED}/ folder"
    for name in model:
        assert graph[name] <= model, f"{name} imports {graph[name] - model}"
        tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
        absolute = [
            node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PACKAGE)
        ]
        # Saved directories load these files as a dynamic module where the package may be absent.
        assert not absolute, f"{name} imports {absolute} by the package's name"
        deep = [
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 1
        ]
        # Copied flat next to the weights: only "from .sibling import" resolves there.
        assert not deep, f"{name} imports {deep} from outside its folder"


def test_the_checker_sees_real_imports():
    # Guards the checks above against passing because the parser found nothing.
    graph, stem = module_graph(), by_stem()
    assert stem["tokenization_baichuan"] in graph[stem["encoding"]]
    assert stem["preprocess"] in graph[stem["data_preview"]]
    assert stem["saving"] in graph[stem["train"]]  # "from ..checkpoints import saving"
