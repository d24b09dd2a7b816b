"""The course book: every chapter notebook, in order, as one PDF (``./build_pdf.sh``).

``prepare`` readies the notebooks for print, ``latex`` renders and compiles the LaTeX,
``build`` runs the whole build and the command line (``python -m tools.book --help``).
"""

from .build import DEFAULT_OUT_DIR, BookResult, build_book, main
from .latex import missing_glyphs, overfull_lines, render_tex
from .prepare import (
    DEFAULT_CHAPTERS,
    BookError,
    Chapter,
    balance_tables,
    clean_text,
    find_chapters,
    has_nbval_marker,
    plain_title,
    prepare_notebook,
    shorten_text,
    strip_nbval_markers,
)

__all__ = [
    "DEFAULT_CHAPTERS",
    "DEFAULT_OUT_DIR",
    "BookError",
    "BookResult",
    "Chapter",
    "balance_tables",
    "build_book",
    "clean_text",
    "find_chapters",
    "has_nbval_marker",
    "main",
    "missing_glyphs",
    "overfull_lines",
    "plain_title",
    "prepare_notebook",
    "render_tex",
    "shorten_text",
    "strip_nbval_markers",
]
