"""The LaTeX half of the book: one ``.tex`` from the prepared notebooks, then XeLaTeX.

``render_tex`` fills the nbconvert template in ``templates/book``; ``run_xelatex``
compiles it twice (for the table of contents) and fails loudly on any LaTeX error;
``missing_glyphs``, ``overfull_lines`` and ``pdf_pages`` read what the run reported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from .prepare import BookError, Chapter

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TITLE = "Building a Large Language Model from Scratch"
SUBTITLE = "From raw text to a trained, fine-tuned and usable GPT"

# fallback fonts for what DejaVu lacks, the first one installed is used
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "Droid Sans Fallback",
    "WenQuanYi Micro Hei",
    "PingFang SC",
    "Hiragino Sans GB",
    "Microsoft YaHei",
)
EMOJI_FONTS = ("Noto Emoji", "Symbola", "Segoe UI Symbol", "Apple Symbols")

_MISSING_CHAR = re.compile(
    r"Missing character: There is no (.+?) \((U\+[0-9A-F]+)\) in font ([^/!:]+)"
)


def render_tex(
    notebooks: Sequence[NotebookNode], chapters: Sequence[Chapter], build_info: str
) -> str:
    """One LaTeX document from prepared notebooks (the ``book`` nbconvert template)."""
    from nbconvert.exporters import LatexExporter

    cells = []
    for nb in notebooks:
        cells.extend(nb.cells)
    for i, cell in enumerate(cells):
        cell["id"] = f"book-{i}"
    book = nbformat.v4.new_notebook(
        cells=cells,
        metadata={"language_info": {"name": "python", "pygments_lexer": "ipython3"}},
    )
    exporter = LatexExporter(
        template_name="book",
        extra_template_basedirs=[str(TEMPLATE_DIR)],
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    fonts = installed_font_families()
    resources = {
        "book": {
            "title": TITLE,
            "subtitle": SUBTITLE,
            "date": date.today().isoformat(),
            "chapter_count": len(chapters),
            "build_info": build_info,
            "cjk_font": _first_installed(CJK_FONTS, fonts),
            "emoji_font": _first_installed(EMOJI_FONTS, fonts),
        }
    }
    tex, _ = exporter.from_notebook_node(book, resources=resources)
    return tex


def installed_font_families() -> set[str]:
    """Font family names the system knows (fontconfig, else matplotlib's font list)."""
    if shutil.which("fc-list"):
        out = subprocess.run(["fc-list", ":", "family"], capture_output=True, text=True)
        return {n.strip() for line in out.stdout.splitlines() for n in line.split(",")}
    from matplotlib import font_manager

    return {font.name for font in font_manager.fontManager.ttflist}


def _first_installed(candidates: Sequence[str], installed: set[str]) -> str:
    # asking XeTeX about a missing font starts METAFONT: choose here instead
    return next((name for name in candidates if name in installed), "")


def run_xelatex(tex_path: Path, runs: int = 2) -> str:
    """Compile with XeLaTeX (twice, for the table of contents); BookError on errors."""
    log_path = tex_path.with_suffix(".log")
    for i in range(runs):
        proc = subprocess.run(
            [
                "xelatex",
                "-halt-on-error",
                "-interaction=nonstopmode",
                "-file-line-error",
                # only the last run needs to make the PDF; earlier ones fill the TOC
                *(["-no-pdf"] if i < runs - 1 else []),
                tex_path.name,
            ],
            cwd=tex_path.parent,
            env={**os.environ, "max_print_line": "10000"},  # unwrapped log lines
            capture_output=True,
            text=True,
            errors="replace",
        )
        log = log_path.read_text(errors="replace") if log_path.exists() else proc.stdout
        if proc.returncode != 0:
            where = _error_chapter(log, tex_path)
            raise BookError(
                f"xelatex failed (run {i + 1}){where}:\n{latex_errors(log)}\n"
                f"full log: {log_path}\nsource: {tex_path}"
            )
    return log


def _error_chapter(log: str, tex_path: Path) -> str:
    """ " in chapter N" for the first ``file:line:`` error of the log, if any."""
    match = re.search(rf"^\./{re.escape(tex_path.name)}:(\d+): ", log, re.MULTILINE)
    if not match:
        return ""
    line = int(match.group(1))
    chapters = [n for start, n in _chapter_starts(tex_path) if start <= line]
    if not chapters:
        return f" in the preamble (line {line} of {tex_path.name})"
    return f" in chapter {chapters[-1]} (line {line} of {tex_path.name})"


def overfull_lines(log: str, tex_path: Path, min_pt: float = 4.0) -> list[str]:
    """Where lines stick out of the text block by more than ``min_pt`` points."""
    starts = _chapter_starts(tex_path)
    found = []
    pattern = r"Overfull \\hbox \(([\d.]+)pt too wide\) .*?at lines? (\d+)"
    for points, line in re.findall(pattern, log):
        if float(points) >= min_pt:
            before = [n for start, n in starts if start <= int(line)]
            where = f"chapter {before[-1]}" if before else "front matter"
            found.append(
                f"{where}, {tex_path.name} line {line} ({float(points):.0f}pt)"
            )
    return found


def _chapter_starts(tex_path: Path) -> list[tuple[int, int]]:
    """(line number, chapter number) of each chapter start in the book's .tex."""
    starts = []
    for i, line in enumerate(tex_path.read_text().splitlines(), start=1):
        match = re.match(r"^\\setcounter\{chapter\}\{(-?\d+)\}$", line)
        if match:
            starts.append((i, int(match.group(1)) + 1))
    return starts


def latex_errors(log: str, context: int = 6) -> str:
    """The error lines of a LaTeX log with a little context."""
    lines = log.splitlines()
    hits = [
        i
        for i, line in enumerate(lines)
        if line.startswith("!") or re.match(r"^[^:\s]+:\d+: ", line)
    ]
    if not hits:
        return "\n".join(lines[-30:])
    out = []
    for i in hits[:3]:
        out += lines[max(0, i - 2) : i + context] + ["..."]
    return "\n".join(out)


def missing_glyphs(log: str) -> dict[str, set[str]]:
    """Characters XeLaTeX could not print, with the fonts that lacked them."""
    found: dict[str, set[str]] = {}
    for char, code, font in _MISSING_CHAR.findall(log):
        if _invisible(int(code[2:], 16)):
            continue  # joiners and variation selectors print nothing anyway
        found.setdefault(f"{char} ({code})", set()).add(font.strip())
    return found


def _invisible(codepoint: int) -> bool:
    return (
        0x200B <= codepoint <= 0x200F
        or 0x2060 <= codepoint <= 0x2064
        or 0xFE00 <= codepoint <= 0xFE0F
    )


def pdf_pages(pdf: Path, latex_log: str = "") -> int | None:
    """Page count from ``pdfinfo``, else from XeLaTeX's log."""
    if shutil.which("pdfinfo") is not None:
        out = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True)
        match = re.search(r"^Pages:\s+(\d+)", out.stdout, re.MULTILINE)
    else:
        match = re.search(
            r"^Output written on .*?\((\d+) pages?", latex_log, re.MULTILINE
        )
    return int(match.group(1)) if match else None


def chapter_pages(tex_path: Path, latex_log: str) -> dict[int, tuple[int, int]]:
    """First and last page (as numbered in the book) of each chapter.

    Chapter starts come from the table of contents (``.toc``), the last page from the
    ``BOOK-LASTPAGE=`` line the template writes to the log; chapters start on a new
    page, so a chapter ends on the page before the next one starts.
    """
    toc = Path(tex_path).with_suffix(".toc")
    if not toc.exists():
        return {}
    starts = [
        (int(number), int(page))
        for number, page in re.findall(
            r"^\\contentsline \{chapter\}\{\\numberline \{(-?\d+)\}.*"
            r"\{(\d+)\}\{[^{}]*\}%?$",
            toc.read_text(errors="replace"),
            re.MULTILINE,
        )
    ]
    last = re.search(r"^BOOK-LASTPAGE=(\d+)", latex_log, re.MULTILINE)
    if not starts or not last:
        return {}
    ends = [page - 1 for _, page in starts[1:]] + [int(last.group(1))]
    return {
        number: (page, end) for (number, page), end in zip(starts, ends, strict=True)
    }


def check_tools() -> None:
    """Fail with install instructions when pandoc or xelatex is missing."""
    missing = [tool for tool in ("xelatex", "pandoc") if shutil.which(tool) is None]
    if missing:
        raise BookError(
            f"missing {' and '.join(missing)}. Install TeX and pandoc:\n"
            "  Debian/Ubuntu: sudo apt-get install texlive-xetex "
            "texlive-fonts-recommended texlive-plain-generic texlive-latex-extra "
            "pandoc fonts-dejavu poppler-utils\n"
            "  macOS:  brew install --cask mactex-no-gui; brew install pandoc poppler\n"
            "  conda:  conda install -c conda-forge texlive-core pandoc poppler"
        )
