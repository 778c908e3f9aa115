"""The package's shape, checked: no import cycles (function-level imports included), a light core, and
tests that share helpers only through conftest and use only lnfree's public names."""

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

PKG = ROOT / "lnfree"
CORE = {"lnfree", "lnfree.errors", "lnfree.norm", "lnfree.model", "lnfree.schedule", "lnfree.export", "lnfree.folded",
        "lnfree.io", "lnfree.references", "lnfree.model_record", "lnfree.lora", "lnfree.paths", "lnfree.families",
        "lnfree.families.base", "lnfree.families.gpt2", "lnfree.families.gpt2_folded", "lnfree.families.llama",
        "lnfree.families.neox", "lnfree.diagnose"}
ENTRY_POINTS = {"lnfree.train", "lnfree.eval", "lnfree.pretrain"}


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path) -> set[str]:
    """Every lnfree module imported anywhere in the file (top level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lnfree")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("lnfree"):
                continue
            for a in node.names:  # `from . import corpus` imports a module, not a name
                sub = f"{mod}.{a.name}"
                found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
    return found


def graph():
    return {module_name(p): imports_of(p) - {module_name(p)} for p in PKG.rglob("*.py")}


def test_no_import_cycle_among_lnfree_modules():
    g = graph()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in g.get(m, ()):
            if n not in g:
                continue
            assert state.get(n) != "open", f"import cycle: {' -> '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [])


def test_core_imports_only_core_and_nothing_imports_an_entry_point():
    g = graph()
    for m in CORE:
        assert g[m] <= CORE, f"{m} imports {g[m] - CORE}"
    for m, deps in g.items():
        if m not in ENTRY_POINTS:
            assert not deps & ENTRY_POINTS, f"{m} imports an entry point: {deps & ENTRY_POINTS}"


def test_no_module_imports_another_modules_private_name():
    found = [f"{p.relative_to(ROOT)}:{node.lineno} imports {a.name}"
             for p in PKG.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lnfree"))
             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_tokenizers_are_loaded_by_io_only():
    """One tokenizer loader (lnfree.io.load_tokenizer): no other module calls a tokenizer's from_pretrained."""
    found = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and "Tokenizer" in ast.unparse(node.func.value)):
                found.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert found and all(f.startswith("lnfree/io.py:") for f in found), found


@pytest.mark.slow
def test_import_lnfree_pulls_in_no_training_or_plotting_stack():
    code = ("import sys, lnfree; heavy = ['lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'wandb', 'datasets',"
            " 'matplotlib']; print([m for m in heavy if m in sys.modules]); "
            "print(all(hasattr(lnfree, f) for f in ('make_removable', 'export_hf', 'export_folded', 'load')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"], out.stdout


def test_tests_share_helpers_only_through_conftest():
    for f in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("test_"):
                raise AssertionError(f"{f.name} imports {node.module}; move shared helpers to conftest.py")


def is_lnfree_module(dotted: str) -> bool:
    path = ROOT / dotted.replace(".", "/")
    return dotted.split(".")[0] == "lnfree" and (path.is_dir() or path.with_suffix(".py").exists())


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_lnfree_names(path) -> list[str]:
    """The private names (one leading underscore) of lnfree modules that a test file imports, reads off a module
    (`import lnfree.x as m` ... `m._y`), patches by name (`setattr(m, "_y", ...)`) or names in a dotted string."""
    tree = ast.parse(path.read_text())
    modules = set()  # the file's names for lnfree modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if is_lnfree_module(a.name)}
        elif isinstance(node, ast.ImportFrom) and is_lnfree_module(node.module or ""):
            found += [f"{path.name}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                      if is_private(a.name)]
            modules |= {a.asname or a.name for a in node.names if is_lnfree_module(f"{node.module}.{a.name}")}

    def is_module(node) -> bool:
        return ast.unparse(node) in modules or is_lnfree_module(ast.unparse(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and is_module(node.value):
            found.append(f"{path.name}:{node.lineno} uses {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("setattr", "getattr")
              and len(node.args) >= 2 and is_module(node.args[0]) and isinstance(node.args[1], ast.Constant)
              and is_private(str(node.args[1].value))):
            found.append(f"{path.name}:{node.lineno} patches {ast.unparse(node.args[0])}.{node.args[1].value}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value
              and is_private(node.value.rsplit(".", 1)[1]) and is_lnfree_module(node.value.rsplit(".", 1)[0])):
            found.append(f"{path.name}:{node.lineno} names {node.value}")
    return found


def test_tests_use_only_public_lnfree_names():
    """Tests go through the API users have: a private helper worth testing on its own is made public."""
    found = [f for p in sorted((ROOT / "tests").glob("*.py")) for f in private_lnfree_names(p)]
    assert not found, found


def test_layout_page_names_every_module():
    block = (ROOT / "docs" / "reference" / "layout.md").read_text().split("```")[1]
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if p.name != "__init__.py" and p.stem not in block]
    missing += [d.name for d in PKG.iterdir() if d.is_dir() and not d.name.startswith("__") and d.name not in block]
    assert not missing, f"docs/reference/layout.md does not mention {missing}"
