"""Print preparation of the book: chapter notebooks as cells the template prints as is.

``prepare_notebook`` drops cells tagged ``remove-cell`` / inputs tagged
``remove-input`` / outputs tagged ``remove-output``, strips nbval markers, ANSI codes
and widgets, shortens very long outputs, turns image outputs into LaTeX figures (PDF
preferred, captioned from the cell's ``caption`` metadata) and converts markdown with
pandoc (``#`` becomes the chapter). ``find_chapters`` finds
``chapters/NN_name/NN_name.ipynb`` in chapter order.
"""

from __future__ import annotations

import base64
import copy
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from shared.data import REPO_ROOT

DEFAULT_CHAPTERS = REPO_ROOT / "chapters"

REMOVE_CELL_TAGS = {"remove-cell", "remove_cell"}
REMOVE_INPUT_TAGS = {"remove-input", "remove_input"}
REMOVE_OUTPUT_TAGS = {"remove-output", "remove_output"}
SOLUTION_TAGS = {"solution"}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
IMAGE_MIMES = ("application/pdf", "image/png", "image/jpeg")  # preferred first
PRINTABLE_MIMES = {*IMAGE_MIMES, "text/latex", "text/markdown", "text/plain"}
MAX_OUTPUT_LINES = 36  # longer text outputs keep their head and tail
MAX_LINE_CHARS = 400  # fvextra wraps long lines; absurdly long ones are cut
FIGURE_MAX_HEIGHT = r"0.7\textheight"

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
        "\\begin{figure}[htbp]\n\\centering\n"
        + images.replace("\n", "\\par\\medskip\n")
        + f"\n\\caption{{{caption_latex}}}\n\\end{{figure}}"
    )


@dataclass
class PrintedImage:
    """An image output the book prints (``printed_images``)."""

    cell_index: int  # position in the notebook, counting every cell from 0
    cell_id: str
    output_index: int
    mime: str  # what the book includes: the PDF when there is one
    data: bytes
    figure: int | None  # k of "Figure C.k" for a captioned cell, else None


def printed_images(nb: NotebookNode) -> list[PrintedImage]:
    """Every image output the book prints, in order, numbered as the book numbers them.

    The same rules as ``prepare_notebook``: tagged cells and outputs are removed,
    widgets dropped, the PDF preferred; the k-th captioned code cell with an image
    is figure k of its chapter (all of that cell's images belong to it).
    """
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        cell.metadata["book_index"] = i
    found, figure = [], 0
    for cell in remove_tagged(nb).cells:
        if cell.cell_type != "code":
            continue
        outputs = [_clean_output(o) for o in cell.get("outputs", [])]
        images = []
        for k, out in enumerate(o for o in outputs if o is not None):
            mime = _image_choice(out.get("data", {}))
            if mime is not None:
                payload = out.data[mime]
                if isinstance(payload, list):
                    payload = "".join(payload)
                images.append((k, mime, base64.b64decode(payload)))
        if not images:
            continue
        number = None
        if cell.metadata.get("caption"):
            figure += 1
            number = figure
        for k, mime, data in images:
            found.append(
                PrintedImage(
                    cell_index=cell.metadata["book_index"],
                    cell_id=str(cell.get("id", "")),
                    output_index=k,
                    mime=mime,
                    data=data,
                    figure=number,
                )
            )
    return found


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


# where a long inline code span may break besides its spaces: after the "." of a
# dotted path (``shared.plotting.use_book_style``) or the "/" of a file path, never
# inside a name (``seed_everything``, ``BOOK_DATA_MIRROR``), a number or a call
_CODE_BREAK = re.compile(r"(?<=[\w)\]])(\.(?=[A-Za-z_\\])|/(?=[\w\\]))")


def _breakable_code(match: re.Match) -> str:
    """Inline code may break at its spaces and after the ``.``/``/`` of long paths."""
    code = match.group(1)
    if len(code) < 16:
        return match.group(0)
    code = _CODE_BREAK.sub(r"\1\\allowbreak{}", code)
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

    # inside a "## Solutions" section every cell is a solution: no extra label there
    cells, in_solution, solutions_section = [], False, False
    for cell in nb.cells:
        i = cell.metadata.pop("book_index", 0)
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type == "markdown":
            headings = re.findall(r"^##\s+(.*)$", cell.source, flags=re.M)
            if headings:  # the last level-2 heading of the cell opens the section
                title = re.sub(r"^[\d.]+\s*", "", headings[-1].strip()).lower()
                solutions_section = title == "solutions"
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
        cell.metadata["book_solution_label"] = (
            is_solution and not in_solution and not solutions_section
        )
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
