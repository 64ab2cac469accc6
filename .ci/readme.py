"""Generate README.md from nbs/index.ipynb without Quarto.

nbdev_readme needs Quarto, which cannot be installed everywhere. This does the same job with
nbconvert: cells marked `#| hide` are dropped, `#|` directive lines are removed from the others,
and the notebook (with its stored outputs) is written as Markdown. The index links to the chapters
as its neighbours in nbs/ (`01_diffusion.ipynb`), which is right for Jupyter and Quarto; README.md
sits one folder up, so those links get an `nbs/` prefix.

    python .ci/readme.py           # write README.md
    python .ci/readme.py --check   # exit 1 if README.md is not what index.ipynb generates
"""
import re
import sys
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r"^#\s*\|\s*(\S+)")


def directives(source: str) -> list:
    "The nbdev directives (`#| name ...`) at the top of a cell."
    return [m.group(1) for line in source.splitlines() if (m := DIRECTIVE.match(line))]


def readme_text(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    "README.md's text as generated from the index notebook."
    nb = nbformat.read(nb_path, as_version=4)
    nb.metadata["language_info"] = {"name": "python"}   # nbdev_clean strips it; code blocks need it
    nb.cells = [c for c in nb.cells if "hide" not in directives(c.source)]
    for c in nb.cells:
        if c.cell_type == "code": c.source = "\n".join(l for l in c.source.splitlines() if not DIRECTIVE.match(l))
    body, _ = MarkdownExporter().from_notebook_node(nb)
    body = re.sub(r"\]\((\w+\.ipynb)\)", r"](nbs/\1)", body)  # links between notebooks, seen from the repository root
    note = "<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file -->\n\n"
    return note + re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"


if __name__ == "__main__":
    text, readme = readme_text(), ROOT / "README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of date: run `python .ci/readme.py` and commit the result")
        print("README.md is up to date")
    else:
        readme.write_text(text)
        print(f"wrote {readme}")
