"""The course book: every chapter notebook, in order, as one PDF (nbconvert, XeLaTeX).

``build_book()`` (and ``./build_pdf.sh``, which calls ``python -m tools.book``) does:

1. find ``chapters/NN_name/NN_name.ipynb`` in chapter order;
2. optionally execute each one in a temporary copy (``--execute``, in ``BOOK_MODE``;
   the executed copies are kept in ``build/book/executed/``);
3. prepare each notebook for print (``prepare.prepare_notebook``);
4. render one ``.tex`` with the nbconvert template in ``tools/book/templates/book`` and
   run ``xelatex`` twice (for the table of contents), failing loudly on any LaTeX error
   (``latex``);
5. report pages (per chapter), figures, figure text below 7 pt at print size
   (``fonts``, a report: it does not fail the build) and any characters the fonts
   could not print.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import nbformat
from nbformat import NotebookNode

from shared.data import REPO_ROOT

from .latex import (
    chapter_pages,
    check_tools,
    missing_glyphs,
    overfull_lines,
    pdf_pages,
    render_tex,
    run_xelatex,
)
from .prepare import (
    DEFAULT_CHAPTERS,
    BookError,
    Chapter,
    clean_text,
    find_chapters,
    has_nbval_marker,
    prepare_notebook,
    read_notebook,
)

if TYPE_CHECKING:  # tools.book.fonts is imported when used: `python -m` runs it too
    from .fonts import FontReport

DEFAULT_OUT_DIR = REPO_ROOT / "build" / "book"
BOOK_NAME = "llm-from-scratch"


@dataclass
class BookResult:
    """What ``build_book`` made."""

    pdf: Path
    tex: Path
    chapters: list[Chapter]
    pages: int | None
    figures: int
    images: int
    missing_glyphs: dict[str, set[str]]  # "␣ (U+2423)" -> fonts
    seconds: float
    overfull: list[str] = field(default_factory=list)  # lines that run into the margin
    chapter_pages: dict[int, tuple[int, int]] = field(default_factory=dict)
    fonts: FontReport | None = None  # figure text at print size (tools.book.fonts)
    font_notes: list[str] = field(default_factory=list)  # why it was not measured

    def summary(self) -> str:
        """A short human-readable report of the build."""
        lines = [
            f"Book: {self.pdf}",
            f"  pages:    {self.pages if self.pages is not None else '?'}",
            f"  chapters: {len(self.chapters)}",
        ]
        for c in self.chapters:
            pages = self.chapter_pages.get(c.number)
            where = f"pp. {pages[0]}-{pages[1]} ({pages[1] - pages[0] + 1} pages)  "
            lines.append(f"    {c.number:>2}  {where if pages else ''}{c.title}")
        lines.append(
            f"  figures:  {self.figures} with captions, {self.images} other images"
        )
        lines += self._font_summary()
        lines.append(f"  build:    {self.seconds:.1f} s (LaTeX source: {self.tex})")
        for c in self.chapters:
            lines += [f"  warning: {c.path.name}: {w}" for w in c.warnings]
        for where in self.overfull:
            lines.append(f"  warning: text runs into the margin: {where}")
        if self.missing_glyphs:
            lines.append(
                f"  WARNING: the fonts lack {len(self.missing_glyphs)} character(s):"
            )
            for char, fonts in sorted(self.missing_glyphs.items()):
                lines.append(f"    {char} in {', '.join(sorted(fonts))}")
        else:
            lines.append("  missing glyphs: none")
        return "\n".join(lines)

    def _font_summary(self) -> list[str]:
        from .fonts import format_pt

        lines = [f"  figure fonts: {note}" for note in self.font_notes]
        report = self.fonts
        if report is None:
            return lines
        small = report.smallest
        if small is not None:
            lines.append(
                f"  figure fonts: smallest text {format_pt(small.smallest_pt)} pt at "
                f"print ({small.label}, {small.notebook.name}); "
                f"wanted >= {report.min_pt:g} pt"
            )
        failing = report.failing
        if failing:
            lines.append(
                f"  warning: {len(failing)} figure(s) print text below "
                f"{report.min_pt:g} pt (python -m tools.book.fonts for details):"
            )
            lines += [f"    {fig.line(report.min_pt).strip()}" for fig in failing]
        if report.unmeasured:
            lines.append(
                f"  figure fonts: {len(report.unmeasured)} image(s) without a PDF "
                "output, not measured"
            )
        return lines


# --------------------------------------------------------------------------- executing


def execute_notebook(
    path: Path, workdir: Path, mode: str, timeout: int = 1800
) -> NotebookNode:
    """Run a notebook in a copy of its chapter folder under ``workdir``; return it."""
    from nbclient.exceptions import CellExecutionError
    from nbconvert.preprocessors import ExecutePreprocessor

    chapter_copy = workdir / path.parent.parent.name / path.parent.name
    shutil.copytree(
        path.parent,
        chapter_copy,
        ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"),
        dirs_exist_ok=True,
    )
    nb = read_notebook(chapter_copy / path.name)
    for cell in nb.cells:  # cells nbval expects to raise may raise here too
        if cell.cell_type == "code" and has_nbval_marker(
            cell.source, "RAISES_EXCEPTION"
        ):
            cell.metadata.setdefault("tags", []).append("raises-exception")
    # the kernel inherits the environment: the mode, and inline figures (PNG + PDF)
    kernel_env = {
        "BOOK_MODE": mode,
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    saved = {key: os.environ.get(key) for key in kernel_env}
    os.environ.update(kernel_env)
    try:
        ExecutePreprocessor(timeout=timeout, kernel_name="python3").preprocess(
            nb, {"metadata": {"path": str(chapter_copy)}}
        )
    except CellExecutionError as err:
        raise BookError(
            f"{path} failed while executing (BOOK_MODE={mode}):\n{clean_text(str(err))}"
        ) from err
    except Exception as err:  # a dead kernel, a cell timeout, ...
        raise BookError(
            f"{path} failed while executing (BOOK_MODE={mode}): "
            f"{type(err).__name__}: {clean_text(str(err))}"
        ) from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    nbformat.write(nb, chapter_copy / path.name)
    return nb


def _link_repo_siblings(chapters_root: Path, workdir: Path) -> None:
    """Let relative paths like ``../../data`` resolve from the temporary copies."""
    for entry in chapters_root.resolve().parent.iterdir():
        if entry.name != chapters_root.name and not entry.name.startswith("."):
            target = workdir / entry.name
            if not target.exists():
                target.symlink_to(entry, target_is_directory=entry.is_dir())


def _build_info() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit = ""
    return f"Built {date.today().isoformat()}" + (
        f" from commit {commit}" if commit else ""
    )


# --------------------------------------------------------------------------- the build


def build_book(
    chapters_root: Path = DEFAULT_CHAPTERS,
    out_dir: Path = DEFAULT_OUT_DIR,
    *,
    execute: bool = False,
    mode: str | None = None,
    timeout: int = 1800,
    name: str = BOOK_NAME,
    log: Callable[[str], None] = print,
) -> BookResult:
    """Build ``out_dir/<name>.pdf`` from every chapter notebook in ``chapters_root``."""
    start = time.perf_counter()
    check_tools()
    chapters_root, out_dir = Path(chapters_root), Path(out_dir)
    chapters = find_chapters(chapters_root)
    if not chapters:
        raise BookError(
            f"no chapter notebooks (NN_name/NN_name.ipynb) under {chapters_root}"
        )
    if execute:
        from shared.mode import get_mode

        if mode is not None:
            os.environ["BOOK_MODE"] = mode
        mode = get_mode()  # validates the name

    figures_dir = out_dir / "figures"
    shutil.rmtree(figures_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared, sources = [], []
    with tempfile.TemporaryDirectory(prefix="book-exec-") as tmp:
        if execute:
            _link_repo_siblings(chapters_root, Path(tmp))
        for chapter in chapters:
            if execute:
                log(f"executing {chapter.path.name} (BOOK_MODE={mode}) ...")
                t0 = time.perf_counter()
                nb = execute_notebook(chapter.path, Path(tmp), mode, timeout)
                log(f"  done in {time.perf_counter() - t0:.0f} s")
                # kept for a look at what was printed (never over the committed file)
                (out_dir / "executed").mkdir(exist_ok=True)
                nbformat.write(nb, out_dir / "executed" / chapter.path.name)
            else:
                nb = read_notebook(chapter.path)
            prepared.append(prepare_notebook(nb, chapter, figures_dir))
            sources.append((chapter, nb))

    tex_path = out_dir / f"{name}.tex"
    tex_path.write_text(render_tex(prepared, chapters, _build_info()))
    log(f"running xelatex on {tex_path} ...")
    latex_log = run_xelatex(tex_path)
    pdf = tex_path.with_suffix(".pdf")
    fonts, font_notes = _check_fonts(sources, latex_log)
    return BookResult(
        pdf=pdf,
        tex=tex_path,
        chapters=chapters,
        pages=pdf_pages(pdf, latex_log),
        figures=sum(c.figures for c in chapters),
        images=sum(c.images for c in chapters),
        missing_glyphs=missing_glyphs(latex_log),
        overfull=overfull_lines(latex_log, tex_path),
        chapter_pages=chapter_pages(tex_path, latex_log),
        fonts=fonts,
        font_notes=font_notes,
        seconds=time.perf_counter() - start,
    )


def _check_fonts(
    sources: Sequence[tuple[Chapter, NotebookNode]], latex_log: str
) -> tuple[FontReport | None, list[str]]:
    """The figure font check over the notebooks the book printed (never fails it)."""
    from .fonts import FontReport, check_page_against_log, notebook_figures

    notes = []
    mismatch = check_page_against_log(latex_log)
    if mismatch:
        notes.append(f"WARNING: {mismatch}")
    try:
        import pdfminer  # noqa: F401  (pdfminer.six, in requirements.txt)
    except ImportError:
        return None, [*notes, "not checked: pdfminer.six is not installed"]
    figures = [
        fig
        for chapter, nb in sources
        for fig in notebook_figures(chapter.path, chapter.number, nb=nb)
    ]
    return FontReport(figures=figures), notes


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``./build_pdf.sh``."""
    parser = argparse.ArgumentParser(
        prog="build_pdf.sh",
        description="Build the course book (PDF) from the chapter notebooks.",
    )
    parser.add_argument(
        "--execute",
        action="store_true",
        help="re-run every notebook first (in a temporary copy)",
    )
    parser.add_argument(
        "--mode",
        choices=["smoke", "laptop", "gpu"],
        help="BOOK_MODE for --execute (default: $BOOK_MODE or laptop)",
    )
    parser.add_argument(
        "--chapters",
        type=Path,
        default=DEFAULT_CHAPTERS,
        help="folder holding NN_name/NN_name.ipynb",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="where the .pdf and .tex go",
    )
    parser.add_argument(
        "--timeout", type=int, default=1800, help="seconds per cell with --execute"
    )
    args = parser.parse_args(argv)
    try:
        result = build_book(
            args.chapters,
            args.out_dir,
            execute=args.execute,
            mode=args.mode,
            timeout=args.timeout,
        )
    except BookError as err:
        print(f"\nBOOK BUILD FAILED: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    print(f"\nPDF written to {result.pdf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
