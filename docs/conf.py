"""Sphinx configuration of comtip's documentation.

Built with ``make docs`` (``sphinx-build -W --keep-going``: every warning is an error). What happens at build time
(see ``docs/README.md``):

- the tutorials are copied from ``../tutorials/*.ipynb`` into ``docs/tutorials/`` (git-ignored) and rendered by
  myst-nb with the outputs they were committed with (``nb_execution_mode = "off"``: the docs never run them);
- the ``--help`` of the ``comtip`` command and of each subcommand is written into ``docs/generated/cli_help.md``
  (git-ignored) from :func:`comtip.cli.build_parser` and included by ``cli.md``;
- autosummary writes one page per object into ``docs/generated/``.
"""

from __future__ import annotations

import os
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # an editable install makes this a no-op; a plain checkout still builds
sys.path.insert(0, str(HERE / "_ext"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "agg")

import comtip  # noqa: E402

# -- project ---------------------------------------------------------------------------------------------------
project = "comtip"
author = "comtip developers"
copyright = f"{date.today().year}, {author}"
version = comtip.__version__
release = comtip.__version__

# -- extensions ------------------------------------------------------------------------------------------------
extensions = [
    "myst_nb",  # Markdown pages (MyST) and notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "comtip_docs",  # docs/_ext/comtip_docs.py: tutorials copied in, CLI help generated
]
# intersphinx is left out on purpose: it downloads the inventories of other projects at build time, which fails
# (with warnings, i.e. errors under -W) on an offline machine. Cross-references to numpy / AnnData / SpatialData
# are rendered as plain text instead.

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "generated/cli_help.md"]

# -- autodoc / autosummary / napoleon --------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"  # types live in the signature (STYLE.md); numpydoc sections carry names only
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True

# -- MyST / myst-nb --------------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # notebooks are committed with their outputs; `make docs-notebooks` re-runs them
nb_merge_streams = True
nb_output_stderr = "show"

# -- HTML ------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"comtip {release}"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/scverse/comtip",
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    "use_source_button": False,
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sourcelink = False

# -- what the extension does at build time ---------------------------------------------------------------------
comtip_tutorials_src = str(ROOT / "tutorials")
comtip_tutorials_dst = str(HERE / "tutorials")
comtip_cli_help = str(HERE / "generated" / "cli_help.md")
