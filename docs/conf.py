"""Sphinx configuration: Markdown pages (MyST) plus API reference from docstrings, built offline.

Build with ``make docs`` (``sphinx-build -W -b html docs docs/_build/html``): warnings are errors and
nothing is fetched from the network (no intersphinx).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # document the checkout, installed or not

from segmentation_models_pytorch import __version__  # noqa: E402

project = "Segmentation Models PyTorch"
author = "segmentation_models_pytorch contributors"
copyright = "segmentation_models_pytorch contributors"  # noqa: A001 - Sphinx's name
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# Fragments pulled into other pages with {include} are not pages of their own.
exclude_patterns = ["_build", "encoders_table.md", "README.md", "**/.ipynb_checkpoints"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"{project} {release}"
html_theme_options = {"description": "Segmentation models with pretrained backbones", "fixed_sidebar": True}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}
html_static_path: list = []

# Pages and fragments written alongside the library by other parts of the project (some generated
# by scripts under benchmarks/). Until one of them exists, its toctree entry is dropped, an
# {include} of it becomes a short note and a {doc} link to it plain text, so the strict (-W) build
# keeps working on partial checkouts. Each is a dependency of the pages that mention it: they are
# rebuilt when it appears or changes.
OPTIONAL_SOURCES = (
    "encoders_table.md",
    "timm_encoders.md",
    "losses.md",
    "metrics.md",
    "save_load.md",
    "architectures.md",
    "arch_encoder_matrix.md",
    "export.md",
    "capability_matrix.md",
)

_INCLUDE = re.compile(r"^```\{include\} (?P<path>\S+)\n(?:.*\n)*?```\n", re.M)


def _handle_optional_sources(app, docname: str, source: list) -> None:
    text = source[0]
    for name in OPTIONAL_SOURCES:
        stem = name[:-3]
        if stem not in text:
            continue
        app.env.note_dependency(str(DOCS / name), docname=docname)
        if (DOCS / name).exists():
            continue
        text = re.sub(rf"^{re.escape(stem)}\n", "", text, flags=re.M)  # toctree entry

        def note(match: re.Match, name: str = name) -> str:
            if Path(match["path"]).name != name:
                return match[0]
            return f"*This section is generated into `docs/{name}`, which is not present in this checkout.*\n"

        text = _INCLUDE.sub(note, text)
        text = text.replace(f"{{doc}}`{stem}`", f"`{name}`")  # cross-reference to the page
    source[0] = text


def setup(app) -> None:
    app.connect("source-read", _handle_optional_sources)
