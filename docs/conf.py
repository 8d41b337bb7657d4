"""Sphinx configuration: MyST Markdown pages, autodoc (with napoleon) for the API reference.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (``pip install -e ".[test]"`` brings
Sphinx, myst-parser and furo). ``tests/test_docs.py`` builds it with ``-W`` and checks every
relative link of the README, the guides and ``bench/README.md``.
"""
from __future__ import annotations

import os
import sys

from sphinx import addnodes

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)  # the package from this checkout, installed or not

project = "scidiff"
author = "scidiff maintainers"
try:
    from scidiff import __version__ as release
except ImportError:  # pragma: no cover - the package cannot be imported (its autodoc fails loudly)
    release = "unknown"
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3  # [text](page.md#a-heading) links, GitHub's slugs
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}  # members: listed per object in api.md
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Cross-references inside docstrings name objects this reference does not document (private
# helpers, classes of other modules); nitpicky mode would turn each into an error. The pages'
# own links are Markdown links, which MyST checks under -W regardless.
nitpicky = False

try:
    import furo  # noqa: F401  (in the test extra)
    html_theme = "furo"
except ImportError:  # Sphinx's own theme: the build must not depend on the theme being installed
    html_theme = "alabaster"
html_title = f"scidiff {release}"


def _benchmarks_link(app, doctree):
    """Links to ../bench/README.md (right on GitHub) point at the page that includes it."""
    bench = os.path.join(ROOT, "bench", "README")
    for node in doctree.findall(addnodes.pending_xref):
        if node.get("reftype") == "myst" and node.get("refdomain") == "doc" \
                and os.path.normpath(os.path.join(DOCS, node["reftarget"])) == bench:
            node["reftarget"] = "benchmarks"


def setup(app):
    app.connect("doctree-read", _benchmarks_link)
