"""Font sizes of the book's figures as printed: every text run at least ``MIN_PT``.

The book includes each figure's PDF output with
``\\adjustimage{max width=\\linewidth, max totalheight=FIGURE_MAX_HEIGHT}``
(``prepare.figure_latex``), so a figure prints at

    scale = min(1, linewidth / figure width, max height / figure height)

and a 9-pt tick label of a figure scaled by 0.7 prints at 6.3 pt. ``figure_fonts``
reads the text of a figure's PDF (pdfminer.six; the text matrix and the CTM are both
applied, so rotated, scaled and mathtext glyphs count at their real size) and
``notebook_figures`` measures every image the book prints from a notebook: cells and
outputs removed by tags are skipped, exactly as ``prepare.prepare_notebook`` skips them.

    python -m tools.book.fonts                       # every chapter notebook
    python -m tools.book.fonts chapters/04_*/04_*.ipynb

prints one line per image and exits 1 when any printed text is smaller than 7 pt.
"""

from __future__ import annotations

import argparse
import io
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from nbformat import NotebookNode

from .prepare import (
    _CHAPTER_FILE,
    DEFAULT_CHAPTERS,
    FIGURE_MAX_HEIGHT,
    find_chapters,
    printed_images,
    read_notebook,
)

MIN_PT = 7.0  # the smallest text a figure may print (tick labels, legends, annotations)
TEMPLATE = Path(__file__).resolve().parent / "templates" / "book" / "index.tex.j2"

# lengths in PDF points (big points, 1/72 in): matplotlib's "pt" and the figures' unit
_UNITS_BP = {
    "bp": 1.0,
    "pt": 72 / 72.27,
    "in": 72.0,
    "mm": 72 / 25.4,
    "cm": 72 / 2.54,
}
_PAPERS_MM = {  # geometry's paper names used by the template: (width, height)
    "a4paper": (210.0, 297.0),
    "a5paper": (148.0, 210.0),
    "b5paper": (176.0, 250.0),
    "letterpaper": (215.9, 279.4),
}


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class Page:
    """The book's text block, in PDF points, as the template's geometry sets it."""

    linewidth: float  # \linewidth where figures sit: the full text width
    textheight: float

    @property
    def max_figure_height(self) -> float:
        """``FIGURE_MAX_HEIGHT`` (e.g. ``0.7\\textheight``) in PDF points."""
        return length_bp(FIGURE_MAX_HEIGHT, textheight=self.textheight)


def length_bp(text: str, textheight: float | None = None) -> float:
    """A LaTeX length (``25mm``, ``14pt``, ``0.7\\textheight``) in PDF points."""
    text = text.strip()
    match = re.fullmatch(r"([\d.]*)\s*\\textheight", text)
    if match:
        if textheight is None:
            raise ValueError(f"{text!r} needs the text height")
        return float(match.group(1) or 1) * textheight
    match = re.fullmatch(r"([\d.]+)\s*(bp|pt|in|mm|cm)", text)
    if not match:
        raise ValueError(f"not a length this check understands: {text!r}")
    return float(match.group(1)) * _UNITS_BP[match.group(2)]


@lru_cache(maxsize=4)
def book_page(template: Path = TEMPLATE) -> Page:
    """The text block from the template's ``\\geometry{...}`` (paper size and margins).

    geometry's defaults apply: the head and foot lie outside the text block, so the
    text height is the paper height less the top and bottom margins. The build checks
    these numbers against the lengths XeLaTeX reports (``check_page_against_log``).
    """
    source = Path(template).read_text()
    match = re.search(r"\\geometry\{([^}]*)\}", source)
    if not match:
        raise ValueError(f"no \\geometry{{...}} in {template}")
    paper, opts = None, {}
    for item in (part.strip() for part in match.group(1).split(",")):
        if item in _PAPERS_MM:
            paper = item
        elif "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            opts[key] = value
    if paper is None:  # the class option, e.g. \documentclass[10pt,a4paper]{book}
        docclass = re.search(r"\\documentclass\[([^\]]*)\]", source)
        options = docclass.group(1).split(",") if docclass else []
        paper = next((o.strip() for o in options if o.strip() in _PAPERS_MM), None)
    if paper is None:
        raise ValueError(f"no paper size this check knows in {template}")
    width, height = (v * _UNITS_BP["mm"] for v in _PAPERS_MM[paper])
    margin = {k: length_bp(opts[k]) for k in ("top", "bottom", "left", "right")}
    if "textwidth" in opts or "includehead" in opts or "includefoot" in opts:
        raise ValueError("book_page does not handle textwidth/includehead: extend it")
    return Page(
        linewidth=width - margin["left"] - margin["right"],
        textheight=height - margin["top"] - margin["bottom"],
    )


def print_scale(width: float, height: float, page: Page | None = None) -> float:
    """How ``max width=\\linewidth, max totalheight=...`` scales a figure (bp in)."""
    page = page or book_page()
    return min(1.0, page.linewidth / width, page.max_figure_height / height)


def check_page_against_log(latex_log: str, page: Page | None = None) -> str | None:
    """A warning when XeLaTeX's reported lengths differ from ``book_page``, else None.

    The template prints ``BOOK-GEOMETRY textwidth=...pt textheight=...pt``.
    """
    page = page or book_page()
    match = re.search(
        r"BOOK-GEOMETRY textwidth=([\d.]+)pt textheight=([\d.]+)pt", latex_log
    )
    if not match:
        return None
    tex_w, tex_h = (float(v) * _UNITS_BP["pt"] for v in match.groups())
    if abs(tex_w - page.linewidth) > 1 or abs(tex_h - page.textheight) > 1:
        return (
            f"the font check assumes a {page.linewidth:.1f} x {page.textheight:.1f} bp "
            f"text block, XeLaTeX used {tex_w:.1f} x {tex_h:.1f} bp: fix book_page"
        )
    return None


# --------------------------------------------------------------------------- one PDF


@dataclass(frozen=True)
class TextRun:
    """Consecutive glyphs of one size: a tick label, a legend entry, a title ..."""

    text: str
    size: float  # in the figure's own PDF points (before the book scales it)


@dataclass
class FigureText:
    """A figure PDF's size (bp) and its text runs."""

    width: float
    height: float
    runs: list[TextRun] = field(default_factory=list)


def _glyph_size(char) -> float:
    """Font size of a glyph as drawn: the font size times the length of the text
    space's y axis under the text matrix and the CTM (pdfminer's ``char.matrix``)."""
    _, _, c, d, _, _ = char.matrix
    return float(char.book_fontsize) * math.hypot(c, d)


def _chars(items) -> Iterable:
    from pdfminer.layout import LTChar, LTContainer

    for item in items:
        if isinstance(item, LTChar):
            yield item
        elif isinstance(item, LTContainer):  # form XObjects (LTFigure) and the like
            yield from _chars(item)


def _layout(pdf: bytes):
    """pdfminer's layout of the first page, each glyph with its ``Tf`` font size."""
    from pdfminer.converter import PDFPageAggregator
    from pdfminer.pdfinterp import PDFPageInterpreter, PDFResourceManager
    from pdfminer.pdfpage import PDFPage

    class Aggregator(PDFPageAggregator):
        def render_char(self, matrix, font, fontsize, scaling, rise, *args):
            adv = super().render_char(matrix, font, fontsize, scaling, rise, *args)
            self.cur_item._objs[-1].book_fontsize = fontsize  # LTChar forgets it
            return adv

    manager = PDFResourceManager()
    device = Aggregator(manager, laparams=None)
    interpreter = PDFPageInterpreter(manager, device)
    page = next(iter(PDFPage.get_pages(io.BytesIO(pdf), maxpages=1)), None)
    if page is None:
        raise ValueError("PDF without pages")
    interpreter.process_page(page)
    return device.get_result()


def figure_text(pdf: bytes) -> FigureText:
    """The first page of a PDF: its size and its text runs (glyphs in stream order)."""
    page = _layout(pdf)
    x0, y0, x1, y1 = page.bbox
    result = FigureText(width=abs(x1 - x0), height=abs(y1 - y0))
    text, size, end = "", 0.0, None
    for char in _chars(page):
        this = _glyph_size(char)
        a, b, _, _, e, f = char.matrix
        # a new run when the size changes or the glyph does not follow the last one
        follows = end is not None and math.dist((e, f), end) <= 0.35 * size
        if text and (abs(this - size) > 0.05 or not follows):
            result.runs.append(TextRun(text, size))
            text = ""
        if not text:
            size = this
        text += char.get_text()
        end = (e + a * char.adv, f + b * char.adv)  # where the next glyph would start
    if text:
        result.runs.append(TextRun(text, size))
    result.runs = [r for r in result.runs if r.text.strip()]
    return result


# --------------------------------------------------------------------------- notebooks


@dataclass
class FigureFonts:
    """One image the book prints, measured."""

    notebook: Path
    label: str  # "Figure 4.3" or "unnumbered image"
    cell_id: str
    cell_index: int  # position in the notebook, counting every cell from 0
    mime: str
    width: float = 0.0  # bp
    height: float = 0.0
    scale: float = 1.0
    runs: list[TextRun] = field(default_factory=list)  # sizes in the figure's points
    error: str = ""

    @property
    def measured(self) -> bool:
        return self.mime == "application/pdf" and not self.error

    def printed(self, run: TextRun) -> float:
        return run.size * self.scale

    @property
    def smallest(self) -> TextRun | None:
        return min(self.runs, key=lambda r: r.size, default=None)

    @property
    def smallest_pt(self) -> float | None:
        run = self.smallest
        return None if run is None else self.printed(run)

    def too_small(self, min_pt: float = MIN_PT) -> list[TextRun]:
        return [r for r in self.runs if self.printed(r) < min_pt - 0.005]

    def where(self) -> str:
        name = self.notebook.name
        return f"{self.label} (cell {self.cell_id}, #{self.cell_index}, {name})"

    def line(self, min_pt: float = MIN_PT) -> str:
        """One line of the report."""
        if self.error:
            return f"ERROR {self.where()}: {self.error}"
        if self.mime != "application/pdf":
            return (
                f"  ?   {self.where()}: {self.mime} only, text not measurable "
                "(use shared.plotting.use_book_style for a PDF beside the PNG)"
            )
        size = f"{self.width / 72:.2f} x {self.height / 72:.2f} in"
        run = self.smallest
        if run is None:
            return f"  ok  {self.where()}: no text, scale {self.scale:.2f} ({size})"
        line = (
            f"{self.where()}: smallest {format_pt(self.printed(run))} pt at print "
            f"({_quote(run.text)}), scale {self.scale:.2f} ({size}"
        )
        if not self.too_small(min_pt):
            return f"  ok  {line})"
        return f"FAIL  {line}; at this scale draw text >= {min_pt / self.scale:.1f} pt)"

    def details(self, min_pt: float = MIN_PT, limit: int = 8) -> list[str]:
        """The distinct runs below ``min_pt``, smallest first (for a failing figure)."""
        groups: dict[tuple[float, float], list[str]] = {}
        for run in self.too_small(min_pt):
            key = (float(format_pt(self.printed(run))), round(run.size, 1))
            groups.setdefault(key, []).append(run.text)
        out = []
        for (printed, drawn), texts in sorted(groups.items())[:limit]:
            sample = ", ".join(_quote(t) for t in dict.fromkeys(texts).keys())
            sample = sample if len(sample) <= 70 else sample[:69] + "…"
            out.append(
                f"        {format_pt(printed)} pt at print ({drawn:.1f} pt drawn) "
                f"x{len(texts)}: {sample}"
            )
        if len(groups) > limit:
            out.append(f"        … {len(groups) - limit} more sizes")
        return out


def format_pt(size: float) -> str:
    """A size to 0.1 pt, rounded down: 6.96 pt shows as 6.9, never as a passing 7.0."""
    return f"{math.floor(size * 10 + 1e-6) / 10:.1f}"


def _quote(text: str, limit: int = 24) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _chapter_number(path: Path) -> int | None:
    match = _CHAPTER_FILE.match(Path(path).parent.name)
    return int(match.group(1)) if match else None


def notebook_figures(
    path: Path,
    number: int | None = None,
    page: Page | None = None,
    nb: NotebookNode | None = None,
) -> list[FigureFonts]:
    """Every image ``path`` (or ``nb``, read from it) prints in the book, measured."""
    path = Path(path)
    number = _chapter_number(path) if number is None else number
    page = page or book_page()
    found = []
    for image in printed_images(read_notebook(path) if nb is None else nb):
        if image.figure is not None:
            label = f"Figure {number if number is not None else '?'}.{image.figure}"
        else:
            label = "unnumbered image"
        fig = FigureFonts(
            notebook=path,
            label=label,
            cell_id=image.cell_id,
            cell_index=image.cell_index,
            mime=image.mime,
        )
        if image.mime == "application/pdf":
            try:
                text = figure_text(image.data)
            except Exception as err:  # a broken PDF is reported, not fatal
                fig.error = f"unreadable PDF: {type(err).__name__}: {err}"
            else:
                fig.width, fig.height, fig.runs = text.width, text.height, text.runs
                fig.scale = print_scale(text.width, text.height, page)
        found.append(fig)
    return found


@dataclass
class FontReport:
    """The check over several notebooks."""

    figures: list[FigureFonts]
    min_pt: float = MIN_PT
    page: Page = field(default_factory=book_page)

    @property
    def failing(self) -> list[FigureFonts]:
        return [f for f in self.figures if f.error or f.too_small(self.min_pt)]

    @property
    def unmeasured(self) -> list[FigureFonts]:
        return [f for f in self.figures if not f.error and not f.measured]

    @property
    def smallest(self) -> FigureFonts | None:
        measured = [f for f in self.figures if f.smallest is not None]
        return min(measured, key=lambda f: f.smallest_pt, default=None)

    def summary(self) -> list[str]:
        """A few lines: per chapter, how many images fail; the smallest text."""
        out = [
            f"figure text at print size: at least {self.min_pt:g} pt wanted "
            f"(\\linewidth {self.page.linewidth / 72:.2f} in, max height "
            f"{self.page.max_figure_height / 72:.2f} in)"
        ]
        by_nb: dict[Path, list[FigureFonts]] = {}
        for fig in self.figures:
            by_nb.setdefault(fig.notebook, []).append(fig)
        for nb, figs in by_nb.items():
            bad = [f for f in figs if f in self.failing]
            sizes = [f.smallest_pt for f in figs if f.smallest_pt is not None]
            low = f"smallest {format_pt(min(sizes))} pt" if sizes else "no text"
            out.append(
                f"  {nb.name}: {len(bad)} of {len(figs)} images below "
                f"{self.min_pt:g} pt, {low}"
            )
        small = self.smallest
        if small is not None:
            out.append(
                f"  smallest: {format_pt(small.smallest_pt)} pt in {small.label} "
                f"({small.notebook.name}, {_quote(small.smallest.text)})"
            )
        if self.unmeasured:
            out.append(f"  not measurable (no PDF output): {len(self.unmeasured)}")
        return out

    def text(self) -> str:
        lines = []
        for fig in self.figures:
            lines.append(fig.line(self.min_pt))
            if fig.too_small(self.min_pt):
                lines += fig.details(self.min_pt)
        return "\n".join([*lines, "", *self.summary()])


def check_notebooks(
    paths: Sequence[Path], min_pt: float = MIN_PT, page: Page | None = None
) -> FontReport:
    """Measure every printed image of ``paths``."""
    page = page or book_page()
    figures = [f for p in paths for f in notebook_figures(Path(p), page=page)]
    return FontReport(figures=figures, min_pt=min_pt, page=page)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.book.fonts",
        description="Font sizes of the book's figures at print size.",
    )
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="default: every chapter notebook"
    )
    parser.add_argument("--min-pt", type=float, default=MIN_PT)
    args = parser.parse_args(argv)
    paths = args.notebooks or [c.path for c in find_chapters(DEFAULT_CHAPTERS)]
    report = check_notebooks(paths, args.min_pt)
    print(report.text())
    return 1 if report.failing else 0


if __name__ == "__main__":
    sys.exit(main())
