"""Sphinx configuration of the scfm-jax documentation (MyST Markdown pages, API from docstrings).

Build: `python -m sphinx -W -b html docs docs/_build/html` (what `.ci/run` runs).
"""
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))  # the checkout's scfm_jax, installed or not

project = "scfm-jax"
author = "the scfm-jax authors"
copyright = "the scfm-jax authors"

extensions = [
    "myst_nb",                      # MyST Markdown pages and the notebook (not executed)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
]
# .rst first: autosummary writes its generated API pages with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# index.md globs every other page (those of the downstream tasks too); on a branch where the
# explicit list already covers them all, the glob matching nothing is expected.
suppress_warnings = ["toc.empty_glob"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3          # [text](page.md#a-heading) links resolve
nb_execution_mode = "off"         # the notebook is run by tests/test_notebook.py, not by the build

# The API reference: one page per public module, generated from the docstrings.
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
# Optional extras a docs build need not install: their modules import them at the top.
autodoc_mock_imports = ["torch", "tiledbsoma", "cellxgene_census", "gcsfs", "scib_metrics", "umap",
                        "libtpu"]
# Docstrings write code in single backticks, Markdown style: render it as code.
default_role = "code"

html_theme = "furo"
html_title = "scfm-jax"

# The notebook lives in notebooks/ (where Colab opens it); the site renders a copy.
NOTEBOOK = REPO / "notebooks" / "analyse_checkpoint.ipynb"
RENDERED_NOTEBOOK = DOCS / "generated" / "analyse_checkpoint.ipynb"

# autosummary rewrites the pages of existing modules at each build but never deletes the page of a
# module that was renamed or removed; such a stale page fails the -W build of a reused checkout.
for stale_page in RENDERED_NOTEBOOK.parent.glob("scfm_jax*.rst"):
    stale_page.unlink()


def _copy_notebook(app):
    RENDERED_NOTEBOOK.parent.mkdir(exist_ok=True)
    if not RENDERED_NOTEBOOK.exists() or RENDERED_NOTEBOOK.read_bytes() != NOTEBOOK.read_bytes():
        shutil.copyfile(NOTEBOOK, RENDERED_NOTEBOOK)


INLINE_CODE = re.compile(r"(``.*?``|`[^`]*`)")


def _escape_prose(line: str) -> str:
    """Characters that reStructuredText reads as markup in plain prose, escaped outside code:
    `|` (substitutions), a `*` that is not a bullet (emphasis), a word's trailing `_` (links)."""
    bullet = re.match(r"^(\s*[*-] )", line)
    head, body = (bullet.group(1), line[bullet.end():]) if bullet else ("", line)
    pieces = INLINE_CODE.split(body)
    for index in range(0, len(pieces), 2):   # even pieces lie outside inline code
        text = pieces[index].replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
        pieces[index] = re.sub(r"(\w)_(?=\W|$)", r"\1\\_", text)
    return head + "".join(pieces)


def plain_text_docstring(app, what, name, obj, options, lines):
    """The package's docstrings are plain text, not reStructuredText: prose paragraphs, and
    indented blocks (commands, aligned field lists) that are meant to be read as laid out. Render
    the prose as text and each indented block as a literal block: no docstring fails the build."""
    result, index, bullet_indent = [], 0, None
    while index < len(lines):
        line = lines[index]
        bullet = re.match(r"^(\s*)[*-] ", line)
        in_list = bullet_indent is not None
        if bullet:
            bullet_indent = len(bullet.group(1)) + 2
        elif not line.strip() or len(line) - len(line.lstrip()) != bullet_indent:
            bullet_indent = None   # a bullet's continuation lines are prose, not a literal block
        starts, ends = bullet and not in_list, in_list and bullet_indent is None
        if result and result[-1].strip() and line.strip() and (starts or ends):
            result.append("")      # a list starts or ends: reStructuredText wants a blank line
        if bullet_indent is None and line.startswith((" ", "\t")) and line.strip():
            block = []
            while index < len(lines) and (lines[index].startswith((" ", "\t"))
                                          or not lines[index].strip()):
                block.append(lines[index])
                index += 1
            while block and not block[-1].strip():
                block.pop()
            if result and result[-1].strip():
                result.append("")
            result += ["::", ""] + block + [""]
            continue
        result.append(_escape_prose(lines[index]))
        index += 1
    lines[:] = result


def setup(app):
    app.connect("builder-inited", _copy_notebook)
    app.connect("autodoc-process-docstring", plain_text_docstring)
