"""The course book: every chapter notebook, in order, as one PDF (nbconvert, XeLaTeX).

``build_book()`` (and ``./build_pdf.sh``, which calls ``python -m shared.book``) does:

1. find ``chapters/NN_name/NN_name.ipynb`` in chapter order;
2. optionally execute each one in a temporary copy (``--execute``, in ``BOOK_MODE``;
   the executed copies are kept in ``build/book/executed/``);
3. prepare each notebook for print (``prepare_notebook``): drop cells tagged
   ``remove-cell`` / inputs tagged ``remove-input`` / outputs tagged ``remove-output``,
   strip nbval markers, ANSI codes and widgets, shorten very long outputs, turn image
   outputs into LaTeX figures (PDF preferred, captioned from the cell's ``caption``
   metadata), convert markdown with pandoc (``#`` becomes the chapter);
4. render one ``.tex`` with the nbconvert template in ``shared/templates/book`` and run
   ``xelatex`` twice (for the table of contents), failing loudly on any LaTeX error;
5. report pages, chapters, figures and any characters the fonts could not print.
"""

from __future__ import annotations

import argparse
import base64
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import nbformat
from nbformat import NotebookNode

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_CHAPTERS = REPO_ROOT / "chapters"
DEFAULT_OUT_DIR = REPO_ROOT / "build" / "book"
BOOK_NAME = "llm-from-scratch"
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

REMOVE_CELL_TAGS = {"remove-cell", "remove_cell"}
REMOVE_INPUT_TAGS = {"remove-input", "remove_input"}
REMOVE_OUTPUT_TAGS = {"remove-output", "remove_output"}
SOLUTION_TAGS = {"solution"}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
IMAGE_MIMES = ("application/pdf", "image/png", "image/jpeg")  # preferred first
PRINTABLE_MIMES = {*IMAGE_MIMES, "text/latex", "text/markdown", "text/plain"}
MAX_OUTPUT_LINES = 36  # longer text outputs keep their head and tail
MAX_LINE_CHARS = 400  # fvextra wraps long lines; absurdly long ones are cut
FIGURE_MAX_HEIGHT = r"0.55\textheight"

_NBVAL_MARKER = re.compile(
    r"^[ \t]*#[ \t]*(NBVAL_[A-Z_]+|PYTEST_VALIDATE_IGNORE_OUTPUT)\b.*$"
)
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CHAPTER_PREFIX = re.compile(
    r"^(?:chapter|ch\.?)\s*\d+\s*(?:[—–:.\-]+\s*)?", re.IGNORECASE
)
_SECTION_NUMBER = re.compile(r"^(#{2,6}[ \t]+)\d+(?:\.\d+)+\.?[ \t]+")
_CHAPTER_FILE = re.compile(r"^(\d{2})_[^/]+$")
_MISSING_CHAR = re.compile(
    r"Missing character: There is no (.+?) \((U\+[0-9A-F]+)\) in font ([^/!:]+)"
)
_SEPARATOR = "BOOKCELLBREAK"


class BookError(RuntimeError):
    """The book could not be built: a notebook or LaTeX error, or a missing tool."""


@dataclass
class Chapter:
    """One chapter of the book: its notebook and what the build found in it."""

    number: int
    path: Path
    title: str = ""
    figures: int = 0  # numbered, captioned figures
    images: int = 0  # images without a caption
    warnings: list[str] = field(default_factory=list)


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

    def summary(self) -> str:
        """A short human-readable report of the build."""
        lines = [
            f"Book: {self.pdf}",
            f"  pages:    {self.pages if self.pages is not None else '?'}",
            f"  chapters: {len(self.chapters)}",
        ]
        lines += [f"    {c.number:>2}  {c.title}" for c in self.chapters]
        lines.append(
            f"  figures:  {self.figures} with captions, {self.images} other images"
        )
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


# --------------------------------------------------------------------------- finding


def find_chapters(chapters_root: Path = DEFAULT_CHAPTERS) -> list[Chapter]:
    """Every ``NN_name/NN_name.ipynb`` under ``chapters_root``, in chapter order."""
    chapters = []
    for folder in sorted(Path(chapters_root).iterdir()):
        match = _CHAPTER_FILE.match(folder.name)
        notebook = folder / f"{folder.name}.ipynb"
        if folder.is_dir() and match and notebook.is_file():
            chapters.append(Chapter(number=int(match.group(1)), path=notebook))
    return chapters


# --------------------------------------------------------------------------- cleaning


def strip_nbval_markers(source: str) -> str:
    """Remove ``# NBVAL_...`` marker lines (test instructions, not course content)."""
    lines = [line for line in source.splitlines() if not _NBVAL_MARKER.match(line)]
    return "\n".join(lines).strip("\n")


def has_nbval_marker(source: str, marker: str) -> bool:
    """Whether a code cell carries ``# NBVAL_<marker>``."""
    return any(
        m and m.group(1) == f"NBVAL_{marker}"
        for m in map(_NBVAL_MARKER.match, source.splitlines())
    )


def clean_text(text: str) -> str:
    """Terminal text as it finally looked: no ANSI codes, carriage returns applied."""
    text = _ANSI.sub("", text).replace("\r\n", "\n")
    lines = []
    for line in text.split("\n"):
        # a progress bar redraws its line with \r: keep what was drawn last
        parts = [p for p in line.split("\r") if p]
        lines.append(
            _CONTROL.sub("", parts[-1] if parts else "").expandtabs(8).rstrip()
        )
    return "\n".join(lines)


def shorten_text(
    text: str, max_lines: int = MAX_OUTPUT_LINES, max_chars: int = MAX_LINE_CHARS
) -> str:
    """Cut very long outputs to their head and tail, and very long lines, saying so."""
    lines = [
        line
        if len(line) <= max_chars
        else f"{line[:max_chars]} …[{len(line) - max_chars} more characters]"
        for line in text.split("\n")
    ]
    if len(lines) > max_lines:
        head, tail = (2 * max_lines) // 3, max_lines // 3
        cut = len(lines) - head - tail
        lines = lines[:head] + [f"…[{cut} more lines]…"] + lines[-tail:]
    return "\n".join(lines)


def _clean_output(output: NotebookNode) -> NotebookNode | None:
    """An output ready for print, or None to drop it (widgets, empty streams)."""
    kind = output.get("output_type")
    if kind == "stream":
        text = shorten_text(clean_text(output.get("text", ""))).strip("\n")
        if not text.strip():
            return None
        output.text = text
    elif kind == "error":
        # the book shows what went wrong, not the traceback's frames
        output.ename = clean_text(output.get("ename", ""))
        output.evalue = shorten_text(clean_text(output.get("evalue", "")))
        output.traceback = []
    elif kind in ("display_data", "execute_result"):
        data = output.get("data", {})
        if WIDGET_MIME in data:  # its text/plain is only "HBox(children=...)"
            return None
        if "text/plain" in data:
            data["text/plain"] = shorten_text(clean_text(data["text/plain"])).strip(
                "\n"
            )
        # what a PDF can show; HTML, SVG and JavaScript fall back to their text
        for mime in [m for m in data if m not in PRINTABLE_MIMES]:
            del data[mime]
        if not data:
            return None
    return output


def _merge_streams(outputs: list[NotebookNode]) -> list[NotebookNode]:
    """Join consecutive stream outputs of the same name, as Jupyter shows them."""
    merged: list[NotebookNode] = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and out.get("output_type") == "stream"
            and prev.get("output_type") == "stream"
            and prev.get("name") == out.get("name")
        ):
            prev.text = prev.text.rstrip("\n") + "\n" + out.text
        else:
            merged.append(out)
    return merged


def remove_tagged(nb: NotebookNode) -> NotebookNode:
    """Apply the ``remove-cell`` / ``remove-input`` / ``remove-output`` tags."""
    from nbconvert.preprocessors import TagRemovePreprocessor

    pre = TagRemovePreprocessor(
        remove_cell_tags=REMOVE_CELL_TAGS,
        remove_input_tags=REMOVE_INPUT_TAGS,
        remove_all_outputs_tags=REMOVE_OUTPUT_TAGS,
        enabled=True,
    )
    nb, _ = pre.preprocess(nb, {})
    return nb


# --------------------------------------------------------------------------- figures


def _image_choice(data: dict) -> str | None:
    return next((mime for mime in IMAGE_MIMES if mime in data), None)


def _figure_files(
    cell: NotebookNode, figures_dir: Path, stem: str
) -> list[tuple[int, str]]:
    """Write a cell's images to ``figures_dir``; return (output index, file name)."""
    files = []
    for k, out in enumerate(cell.get("outputs", [])):
        mime = _image_choice(out.get("data", {}))
        if mime is None:
            continue
        ext = {"application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpg"}[mime]
        payload = out.data[mime]
        if isinstance(payload, list):
            payload = "".join(payload)
        name = f"{stem}-o{k}.{ext}"
        figures_dir.mkdir(parents=True, exist_ok=True)
        (figures_dir / name).write_bytes(base64.b64decode(payload))
        files.append((k, name))
    return files


def figure_latex(
    files: Sequence[str], caption_latex: str | None, folder: str = "figures"
) -> str:
    """LaTeX for a cell's images: a numbered ``figure`` when there is a caption."""
    images = "\n".join(
        rf"\adjustimage{{max width=\linewidth, max totalheight={FIGURE_MAX_HEIGHT}}}"
        rf"{{{folder}/{name}}}"
        for name in files
    )
    if caption_latex is None:
        return f"\\begin{{center}}\n{images}\n\\end{{center}}"
    return (
        "\\begin{figure}[H]\n\\centering\n"
        + images.replace("\n", "\\par\\medskip\n")
        + f"\n\\caption{{{caption_latex}}}\n\\end{{figure}}"
    )


# --------------------------------------------------------------------------- markdown


def _split_fences(source: str) -> list[tuple[str, bool]]:
    """Lines of markdown, each flagged True when inside a fenced code block."""
    out, fence = [], None
    for line in source.splitlines():
        stripped = line.lstrip()
        if fence is None and stripped[:3] in ("```", "~~~"):
            fence = stripped[:3]
            out.append((line, True))
        elif fence is not None:
            out.append((line, True))
            if stripped.startswith(fence):
                fence = None
        else:
            out.append((line, False))
    return out


_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$")


def _table_cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]


def balance_tables(markdown: str) -> str:
    """Give wide pipe tables column widths that follow their content.

    Pandoc sizes a wrapped table's columns by the dashes of its rule line; notebooks
    write equal dashes, which squeezes a long "what it does" column. Damped by a
    square root so that short columns keep a readable width.
    """
    lines = markdown.splitlines()
    flags = [in_code for _, in_code in _split_fences(markdown)]
    for i in range(1, len(lines)):
        if flags[i] or not _TABLE_RULE.match(lines[i]) or "|" not in lines[i - 1]:
            continue
        rule = _table_cells(lines[i])
        rows = [lines[i - 1]]
        for line in lines[i + 1 :]:
            if "|" not in line or not line.strip():
                break
            rows.append(line)
        widths = [1.0] * len(rule)
        for row in rows:
            for k, cell in enumerate(_table_cells(row)[: len(rule)]):
                widths[k] = max(widths[k], len(cell))
        weights = [max(w, 10) ** 0.5 for w in widths]
        dashes = [max(3, round(60 * w / sum(weights))) for w in weights]
        cells = [
            (":" if c.startswith(":") else "")
            + "-" * n
            + (":" if c.endswith(":") else "")
            for c, n in zip(rule, dashes, strict=True)
        ]
        lines[i] = "|" + "|".join(cells) + "|"
    return "\n".join(lines)


def plain_title(markdown: str) -> str:
    """A heading's text without markdown markup (for the summary and the tests)."""
    text = re.sub(r"`|(?<!\w)[*_]+|[*_]+(?!\w)", "", markdown)  # keep snake_case
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return text.replace("$", "").strip()


def chapter_headings(
    nb: NotebookNode, fallback: str
) -> tuple[NotebookNode, str, list[str]]:
    """Make the first ``#`` heading the chapter title; demote any other ``#`` heading.

    "Chapter 3 — The GPT model" becomes "The GPT model" and "## 3.2 Blocks" becomes
    "## Blocks": LaTeX numbers chapters and sections.
    Returns the notebook, the plain title, and warnings.
    """
    warnings, title = [], None
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = []
        for line, in_code in _split_fences(cell.source):
            match = None if in_code else re.match(r"^#[ \t]+(.*?)[ \t#]*$", line)
            if match and title is None:
                text = _CHAPTER_PREFIX.sub("", match.group(1)).strip() or match.group(1)
                title = plain_title(text)
                line = f"# {text}"
            elif match:
                warnings.append(
                    f"second '#' heading {match.group(1)!r} printed as a section"
                )
                line = "#" + line
            elif not in_code:
                # "## 4.2 The loop": LaTeX numbers sections itself
                line = _SECTION_NUMBER.sub(r"\1", line)
            lines.append(line)
        cell.source = "\n".join(lines)
    if title is None:
        title = fallback
        warnings.append(f"no '#' heading: chapter titled {fallback!r}")
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {fallback}"))
    return nb, title, warnings


def pandoc_markdown_to_latex(texts: Sequence[str]) -> list[str]:
    """Markdown snippets to LaTeX in one pandoc call (``#`` becomes ``\\chapter``)."""
    if not texts:
        return []
    marker = [f"{_SEPARATOR}{i:05d}" for i in range(len(texts))]
    joined = "\n\n".join(
        f"{text}\n\n{m}" for text, m in zip(texts, marker, strict=True)
    )
    latex = _run_pandoc(joined)
    parts = re.split(rf"^{_SEPARATOR}(\d{{5}})$", latex, flags=re.MULTILINE)
    # parts: [text0, "00000", text1, "00001", ..., trailing]
    if parts[1::2] != [m[len(_SEPARATOR) :] for m in marker]:
        # a snippet swallowed its separator (e.g. an unclosed fence): one call each
        return [_run_pandoc(text) for text in texts]
    return [p.strip("\n") for p in parts[0:-1:2]]


def _run_pandoc(markdown: str) -> str:
    cmd = [
        "pandoc",
        "--from=markdown-auto_identifiers+tex_math_dollars+raw_tex",
        "--to=latex",
        "--top-level-division=chapter",
        "--wrap=none",
    ]
    proc = subprocess.run(cmd, input=markdown, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BookError(f"pandoc failed: {proc.stderr.strip()}")
    # plain verbatim cannot wrap long lines; fvextra's Verbatim can
    latex = re.sub(r"\\(begin|end)\{verbatim\}", r"\\\1{Verbatim}", proc.stdout)
    latex = re.sub(r"\\texttt\{((?:[^{}\\]|\\[_&%#$])+)\}", _breakable_code, latex)
    # markdown images: never wider than the text
    return latex.replace(
        r"\includegraphics{",
        rf"\adjustimage{{max width=\linewidth, max totalheight={FIGURE_MAX_HEIGHT}}}{{",
    )


def _breakable_code(match: re.Match) -> str:
    """Inline code may break after ``.``, ``_``, ``/`` and ``(``: long names fit."""
    code = match.group(1)
    if len(code) < 16:
        return match.group(0)
    code = re.sub(r"(\\_|[./(,=])", r"\1\\allowbreak{}", code)
    return f"\\texttt{{{code}}}"


# --------------------------------------------------------------------------- preparing


def prepare_notebook(
    nb: NotebookNode,
    chapter: Chapter,
    figures_dir: Path,
    md2latex: Callable[[Sequence[str]], list[str]] = pandoc_markdown_to_latex,
) -> NotebookNode:
    """Turn one chapter notebook into cells the book template prints as they are."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):  # number cells as the author sees them
        cell.metadata["book_index"] = i
    nb = remove_tagged(nb)
    fallback = chapter.path.parent.name[3:].replace("_", " ").capitalize()
    nb, chapter.title, chapter.warnings = chapter_headings(nb, fallback)

    # markdown cells and figure captions go through pandoc together
    snippets: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            snippets.append(
                balance_tables(_with_attachments(cell, figures_dir, chapter.number))
            )
        elif cell.cell_type == "code" and cell.metadata.get("caption"):
            snippets.append(str(cell.metadata["caption"]))
    converted = iter(md2latex(snippets))

    cells, in_solution = [], False
    for cell in nb.cells:
        i = cell.metadata.pop("book_index", 0)
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type == "markdown":
            cell = nbformat.v4.new_raw_cell(
                next(converted), metadata={"book_latex": True}
            )
        elif cell.cell_type == "code":
            caption = next(converted) if cell.metadata.get("caption") else None
            cell = _prepare_code_cell(
                cell, caption, figures_dir, f"ch{chapter.number:02d}-c{i:03d}", chapter
            )
        else:
            continue  # raw cells of the notebooks are not part of the book
        is_solution = bool(tags & SOLUTION_TAGS)
        cell.metadata["book_solution_label"] = is_solution and not in_solution
        in_solution = is_solution
        cell.metadata["tags"] = sorted(tags)
        cells.append(cell)

    # LaTeX numbers chapters from 1; the course starts at 0
    start = nbformat.v4.new_raw_cell(
        f"\\setcounter{{chapter}}{{{chapter.number - 1}}}",
        metadata={"book_latex": True},
    )
    nb.cells = [start, *cells]
    return nb


def _with_attachments(cell: NotebookNode, figures_dir: Path, number: int) -> str:
    """Markdown source with ``attachment:`` images written out as files."""
    source = cell.source
    for name, bundle in (cell.get("attachments") or {}).items():
        mime = _image_choice(bundle)
        if mime is None:
            continue
        figures_dir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"ch{number:02d}-att-{name}")
        (figures_dir / safe).write_bytes(base64.b64decode(bundle[mime]))
        source = source.replace(f"attachment:{name}", f"{figures_dir.name}/{safe}")
    return source


def _prepare_code_cell(
    cell: NotebookNode,
    caption: str | None,
    figures_dir: Path,
    stem: str,
    chapter: Chapter,
) -> NotebookNode:
    cell.source = strip_nbval_markers(cell.source)
    outputs = [
        o for o in (_clean_output(o) for o in cell.get("outputs", [])) if o is not None
    ]
    cell.outputs = outputs
    files = _figure_files(cell, figures_dir, stem)
    if files:
        if caption is not None:
            chapter.figures += 1
        else:
            chapter.images += len(files)
        keep = {k for k, _ in files}
        if caption is not None:
            # one numbered figure, where the cell showed its last image
            fig = figure_latex([name for _, name in files], caption, figures_dir.name)
            new = []
            for k, out in enumerate(outputs):
                if k == files[-1][0]:
                    new.append(_latex_output(fig))
                elif k not in keep:
                    new.append(out)
            outputs = new
        else:
            names = dict(files)
            outputs = [
                _latex_output(figure_latex([names[k]], None, figures_dir.name))
                if k in names
                else out
                for k, out in enumerate(outputs)
            ]
        # "<Figure size 700x400 with 1 Axes>" says nothing in print
        outputs = [o for o in outputs if not _is_figure_repr(o)]
    elif caption is not None:
        chapter.warnings.append(
            f"cell {int(stem.rsplit('-c', 1)[1])} has a caption but no image output"
        )
    cell.outputs = _merge_streams(outputs)
    if not cell.source.strip() and not cell.outputs:
        cell.metadata["transient"] = {"remove_source": True}
    return cell


def _latex_output(latex: str) -> NotebookNode:
    return nbformat.v4.new_output("display_data", data={"text/latex": latex})


def _is_figure_repr(output: NotebookNode) -> bool:
    data = output.get("data", {})
    text = data.get("text/plain", "")
    return set(data) == {"text/plain"} and bool(
        re.fullmatch(r"<Figure size .*>", text.strip())
    )


def read_notebook(path: Path) -> NotebookNode:
    """Read a notebook, or fail with a message that names it."""
    try:
        return nbformat.read(path, as_version=4)
    except Exception as err:  # JSON or schema errors alike
        raise BookError(f"{path} is not a readable notebook: {err}") from err


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


# --------------------------------------------------------------------------- LaTeX


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
    prepared = []
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

    tex_path = out_dir / f"{name}.tex"
    tex_path.write_text(render_tex(prepared, chapters, _build_info()))
    log(f"running xelatex on {tex_path} ...")
    latex_log = run_xelatex(tex_path)
    pdf = tex_path.with_suffix(".pdf")
    return BookResult(
        pdf=pdf,
        tex=tex_path,
        chapters=chapters,
        pages=pdf_pages(pdf, latex_log),
        figures=sum(c.figures for c in chapters),
        images=sum(c.images for c in chapters),
        missing_glyphs=missing_glyphs(latex_log),
        overfull=overfull_lines(latex_log, tex_path),
        seconds=time.perf_counter() - start,
    )


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
