"""Package hygiene: every module has its notebook, sd_book imports only its runtime dependencies,
one version everywhere, and the README matches the index notebook."""
import ast
import configparser
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "sd_book"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "_modidx"))
RUNTIME = {"torch", "safetensors", "huggingface_hub", "PIL", "tqdm", "sd_book"}
BOOK_ONLY_LAZY = {"matplotlib"}  # plotting helpers may import it inside the function that draws
ORACLES = ["transformers", "diffusers", "sentencepiece", "tokenizers", "regex", "ftfy", "google.protobuf",
           "matplotlib", "scipy", "numpy", "fastcore", "nbdev", "ipywidgets"]


def default_exports() -> dict:
    "module name -> notebook that declares it with `#| default_exp`."
    found = {}
    for nb in (ROOT / "nbs").glob("*.ipynb"):
        for cell in json.loads(nb.read_text())["cells"]:
            for line in "".join(cell["source"]).splitlines():
                if line.replace(" ", "").startswith("#|default_exp"): found[line.split()[-1]] = nb.name
    return found


def test_every_module_has_its_notebook():
    exports = default_exports()
    assert MODULES, "sd_book has no modules"
    orphans = [m for m in MODULES if m not in exports]
    assert not orphans, f"modules without a notebook declaring `#| default_exp`: {orphans}"


def imports(tree, top_level: bool) -> set:
    "Top-level package names imported at module level (top_level) or inside functions (not top_level)."
    nodes = tree.body if top_level else [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)]
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import): names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0: names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_runtime_dependencies(module):
    tree = ast.parse((PKG / f"{module}.py").read_text())
    stdlib = set(sys.stdlib_module_names)
    bad = imports(tree, top_level=True) - RUNTIME - stdlib
    assert not bad, f"sd_book.{module} imports {sorted(bad)} at module level; allowed: {sorted(RUNTIME)} and the standard library"
    bad_lazy = imports(tree, top_level=False) - RUNTIME - stdlib - BOOK_ONLY_LAZY
    assert not bad_lazy, f"sd_book.{module} imports {sorted(bad_lazy)} inside a function"


def test_import_without_reference_libraries():
    "Every module imports in a fresh interpreter in which the oracles and book-only packages cannot be imported."
    blocker = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {ORACLES!r}): raise ModuleNotFoundError("blocked: " + name)
sys.meta_path.insert(0, Block())
import importlib
for m in {MODULES!r}: importlib.import_module("sd_book." + m)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_one_version():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    version = cfg["DEFAULT"]["version"]
    import sd_book
    assert sd_book.__version__ == version
    assert importlib.metadata.version("sd_book") == version


def test_readme_is_generated_from_index():
    sys.path.insert(0, str(ROOT / ".ci"))
    from readme import readme_text
    assert (ROOT / "README.md").read_text() == readme_text(), "README.md is out of date: run python .ci/readme.py"


def test_quick_start_has_two_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick.split("```bash", 1)[1].split("```", 1)[0]
    lines = [l for l in block.splitlines() if l.strip()]
    assert len(lines) == 2 and lines[0].startswith("pip install") and "nbdev_test" in lines[1], lines


def test_every_checker_is_importable_from_testing():
    "Exercises import their checkers from sd_book.testing; each chapter's `check_*` must be found there."
    import importlib
    import sd_book.testing as testing
    checkers = {(m, n) for m in MODULES if m != "testing"
                for n in dir(importlib.import_module(f"sd_book.{m}")) if n.startswith("check_")}
    assert checkers, "no chapter defines an exercise checker"
    for module, name in sorted(checkers):
        assert getattr(testing, name) is getattr(importlib.import_module(f"sd_book.{module}"), name), f"{name} from sd_book.{module}"
