"""Tests of the PDF book build (tools/book/).

Fast tests check the print preparation of notebooks without TeX; one test builds the
whole book from the committed chapter notebooks when xelatex and pandoc are installed.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
import unicodedata

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tools import book
from tools.book import fonts

FAKE_PDF = b"%PDF-1.4 fake figure"
FAKE_PNG = b"\x89PNG fake figure"


def fake_md2latex(texts):
    """Stand-in for pandoc: marks each snippet so the tests can find it."""
    return [f"MD<{t}>" for t in texts]


def figure_output(with_pdf: bool = True):
    data = {
        "image/png": base64.b64encode(FAKE_PNG).decode(),
        "text/plain": "<Figure size 700x400 with 1 Axes>",
    }
    if with_pdf:
        data["application/pdf"] = base64.b64encode(FAKE_PDF).decode()
    return new_output("display_data", data=data)


def stream(text: str, name: str = "stdout"):
    return new_output("stream", name=name, text=text)


def sample_notebook():
    cells = [
        new_markdown_cell("# Chapter 2 — Attention\n\nWhat you will build."),
        new_code_cell("import secret_setup", metadata={"tags": ["remove-cell"]}),
        new_code_cell(
            "# NBVAL_CHECK_OUTPUT\nx = 1  # a normal comment\nprint(x)",
            outputs=[stream("1\n")],
        ),
        new_code_cell(
            "print('only the output')",
            metadata={"tags": ["remove-input"]},
            outputs=[stream("only the output\n")],
        ),
        new_code_cell(
            "for _ in tqdm(range(3)): pass",
            metadata={"tags": ["remove-output"]},
            outputs=[stream("100%|███| 3/3\n", "stderr")],
        ),
        new_code_cell(
            "plot()",
            metadata={"caption": "Attention weights of head $h$."},
            outputs=[stream("drawing\n"), figure_output()],
        ),
        new_code_cell("plot_png_only()", outputs=[figure_output(with_pdf=False)]),
        new_code_cell(
            "slider()",
            outputs=[
                new_output(
                    "display_data",
                    data={
                        "application/vnd.jupyter.widget-view+json": {"model_id": "x"},
                        "text/plain": "IntSlider(value=0)",
                    },
                )
            ],
        ),
        new_code_cell(
            "# NBVAL_IGNORE_OUTPUT\nprint('progress')",
            outputs=[stream("\x1b[31mred\x1b[0m 10%\r50%\r100%\n")],
        ),
        new_code_cell(
            "frame",
            outputs=[
                new_output(
                    "execute_result",
                    data={"text/html": "<table/>", "text/plain": "   a\n0  1"},
                    execution_count=1,
                ),
                new_output("display_data", data={"image/svg+xml": "<svg/>"}),
            ],
        ),
        new_markdown_cell("# A second top-level heading"),
        new_markdown_cell("## 2.10 Exercises\n\n**Exercise 2.1.** Why?\n\n## 2 heads"),
        new_code_cell("answer = 42", metadata={"tags": ["solution"]}),
        new_markdown_cell("Because.", metadata={"tags": ["solution"]}),
    ]
    return new_notebook(cells=cells)


@pytest.fixture
def prepared(tmp_path):
    chapter = book.Chapter(
        number=2, path=tmp_path / "02_attention" / "02_attention.ipynb"
    )
    nb = book.prepare_notebook(
        sample_notebook(), chapter, tmp_path / "figures", fake_md2latex
    )
    return nb, chapter, tmp_path / "figures"


def all_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append(str(out.get("text", "")))
            parts.extend(str(v) for v in out.get("data", {}).values())
    return "\n".join(parts)


def test_strip_nbval_markers_keeps_code_and_comments():
    source = (
        "# NBVAL_CHECK_OUTPUT\n#NBVAL_SKIP\nx = 1  # keep me\n"
        "  # NBVAL_RAISES_EXCEPTION\ny"
    )
    assert book.strip_nbval_markers(source) == "x = 1  # keep me\ny"
    assert book.has_nbval_marker(source, "RAISES_EXCEPTION")
    assert not book.has_nbval_marker("x = 1", "SKIP")


def test_clean_text_strips_ansi_and_applies_carriage_returns():
    assert book.clean_text("\x1b[1;31mError\x1b[0m: bad\r\n") == "Error: bad\n"
    assert book.clean_text("10%\r50%\r100% done") == "100% done"


def test_shorten_text_keeps_head_and_tail():
    text = "\n".join(f"line {i}" for i in range(200))
    short = book.shorten_text(text, max_lines=30).splitlines()
    assert short[0] == "line 0" and short[-1] == "line 199"
    assert len(short) == 31 and "170 more lines" in short[20]
    long_line = book.shorten_text("x" * 1000, max_chars=100)
    assert long_line.startswith("x" * 100) and "900 more characters" in long_line


def test_tags_remove_cells_inputs_and_outputs(prepared):
    nb, _, _ = prepared
    text = all_text(nb)
    assert "secret_setup" not in text  # remove-cell
    hidden_input = next(c for c in nb.cells if "only the output" in c.source)
    assert hidden_input.metadata["transient"] == {"remove_source": True}  # remove-input
    assert hidden_input.outputs[0].text == "only the output"
    progress = next(c for c in nb.cells if "tqdm" in c.source)
    assert progress.outputs == []  # remove-output


def test_nbval_markers_ansi_and_widgets_are_not_printed(prepared):
    nb, _, _ = prepared
    text = all_text(nb)
    assert "NBVAL" not in text
    assert "# a normal comment" in text
    assert "\x1b" not in text and "100%" in text and "50%" not in text
    slider = next(c for c in nb.cells if c.source == "slider()")
    assert slider.outputs == []
    # HTML and SVG cannot be printed: the text form is kept, an SVG-only output dropped
    frame = next(c for c in nb.cells if c.source == "frame")
    assert [dict(o.data) for o in frame.outputs] == [{"text/plain": "   a\n0  1"}]


def test_caption_becomes_numbered_figure_preferring_pdf(prepared):
    nb, chapter, figures = prepared
    cell = next(c for c in nb.cells if c.source == "plot()")
    kinds = [o.output_type for o in cell.outputs]
    assert kinds == ["stream", "display_data"]  # text kept, "<Figure size ...>" dropped
    latex = cell.outputs[1].data["text/latex"]
    assert latex.startswith("\\begin{figure}")
    assert "\\caption{MD<Attention weights of head $h$.>}" in latex
    pdf_name = re.search(r"\{figures/([^}]+\.pdf)\}", latex).group(1)
    assert (figures / pdf_name).read_bytes() == FAKE_PDF
    # an image without a caption is centred, not a numbered figure
    plain = next(c for c in nb.cells if c.source == "plot_png_only()")
    plain_latex = plain.outputs[0].data["text/latex"]
    assert "\\caption" not in plain_latex and ".png}" in plain_latex
    assert (chapter.figures, chapter.images) == (1, 1)


def test_chapter_title_numbering_and_solutions(prepared):
    nb, chapter, _ = prepared
    assert chapter.title == "Attention"
    assert nb.cells[0].source == "\\setcounter{chapter}{1}"  # LaTeX then says Chapter 2
    assert nb.cells[1].source.startswith("MD<# Attention\n")
    exercises = next(c for c in nb.cells if "Exercise 2.1" in c.source)
    assert exercises.source.startswith("MD<## Exercises\n")  # LaTeX numbers it
    assert "## 2 heads" in exercises.source  # a heading that only starts with a number
    demoted = next(c for c in nb.cells if "second top-level" in c.source)
    assert demoted.source == "MD<## A second top-level heading>"
    assert any("second '#' heading" in w for w in chapter.warnings)
    labels = [c.metadata.get("book_solution_label") for c in nb.cells[-2:]]
    assert labels == [True, False]  # one "Solution" label per run of solution cells


def test_no_solution_label_inside_a_solutions_section(tmp_path):
    cells = [
        new_markdown_cell("# Attention"),
        new_markdown_cell("**Exercise 2.1.** Why?"),
        new_markdown_cell("## Solutions"),
        new_markdown_cell("*Solution 2.1.*", metadata={"tags": ["solution"]}),
        new_code_cell("answer = 42", metadata={"tags": ["solution"]}),
        new_markdown_cell("## References\n\n1. A paper."),
        new_markdown_cell("Late answer.", metadata={"tags": ["solution"]}),
    ]
    chapter = book.Chapter(number=2, path=tmp_path / "02_a" / "02_a.ipynb")
    nb = book.prepare_notebook(
        new_notebook(cells=cells), chapter, tmp_path / "figures", fake_md2latex
    )
    labels = [bool(c.metadata.get("book_solution_label")) for c in nb.cells[-4:]]
    assert labels == [False, False, False, True]  # labelled again outside the section


def test_notebook_without_heading_gets_one_from_its_folder(tmp_path):
    chapter = book.Chapter(
        number=5, path=tmp_path / "05_memory_optimization" / "x.ipynb"
    )
    nb = new_notebook(cells=[new_markdown_cell("Some text.")])
    book.prepare_notebook(nb, chapter, tmp_path / "figures", fake_md2latex)
    assert chapter.title == "Memory optimization"


def test_plain_title_drops_markup_but_not_snake_case():
    assert book.plain_title("The `train_loop` and **why** _it_ works") == (
        "The train_loop and why it works"
    )
    assert book.plain_title("See [the docs](https://x.org)") == "See the docs"


def test_find_chapters_in_order(tmp_path):
    for name in ["10_extra", "02_b", "00_a", "notes", "03_missing"]:
        (tmp_path / name).mkdir()
    for name in ["10_extra", "02_b", "00_a"]:
        nbformat.write(new_notebook(), tmp_path / name / f"{name}.ipynb")
    (tmp_path / "00_a" / "scratch.ipynb").write_text("{}")
    found = [(c.number, c.path.name) for c in book.find_chapters(tmp_path)]
    assert found == [(0, "00_a.ipynb"), (2, "02_b.ipynb"), (10, "10_extra.ipynb")]


def test_balance_tables_follows_content_and_keeps_alignment():
    md = "| A | What it does |\n|---|:---:|\n| x | " + "long words " * 12 + "|"
    rule = book.balance_tables(md).splitlines()[1]
    first, second = rule.strip("|").split("|")
    assert len(second) > 2 * len(first)
    assert second.startswith(":") and second.endswith(":")
    fenced = "```\n| a | b |\n|---|---|\n```"
    assert book.balance_tables(fenced) == fenced


def test_missing_glyphs_are_parsed_from_the_log():
    log = (
        "Missing character: There is no 🚀 (U+1F680) in font DejaVu Serif/OT:s;!\n"
        "Missing character: There is no 🚀 (U+1F680) in font DejaVu Sans Mono/OT:s;!\n"
        "Missing character: There is no 日 (U+65E5) in font DejaVu Serif/OT:s;!\n"
        "Missing character: There is no \u200d (U+200D) in font DejaVu Serif/OT:s;!\n"
    )
    found = book.missing_glyphs(log)
    assert found == {
        "🚀 (U+1F680)": {"DejaVu Serif", "DejaVu Sans Mono"},
        "日 (U+65E5)": {"DejaVu Serif"},
    }


def test_overfull_lines_are_located_by_chapter(tmp_path):
    tex = tmp_path / "book.tex"
    tex.write_text(
        "preamble\n\\setcounter{chapter}{-1}\nx\n\\setcounter{chapter}{0}\ny\n"
    )
    log = (
        "Overfull \\hbox (2.0pt too wide) in paragraph at lines 3--3\n"
        "Overfull \\hbox (40.5pt too wide) in paragraph at lines 5--5\n"
        "Overfull \\hbox (12.0pt too wide) detected at line 1\n"
    )
    assert book.overfull_lines(log, tex) == [
        "chapter 1, book.tex line 5 (40pt)",
        "front matter, book.tex line 1 (12pt)",
    ]


def test_template_renders_a_book_without_tex(prepared):
    nb, chapter, _ = prepared
    tex = book.render_tex([nb], [chapter], "test build")
    assert "\\documentclass[10pt,a4paper,oneside,openany]{book}" in tex
    assert "\\tableofcontents" in tex and "\\setcounter{chapter}{1}" in tex
    assert "\\begin{figure}[htbp]" in tex and "\\BookSolution" in tex
    assert "\\usepackage{flafter}" in tex  # figures never float above their text
    assert "\\usepackage[section]{placeins}" in tex  # ... nor out of their section
    assert "BOOK-GEOMETRY" in tex and "BOOK-LASTPAGE" in tex  # read by the build
    assert (
        "NBVAL" not in tex and "secret\\_setup" not in tex and "secret_setup" not in tex
    )
    assert "print('only the output')" not in tex


# ---------------------------------------------------------------------- the real book


def normalize(text: str) -> str:
    """Typographic quotes and dashes as ASCII, whitespace collapsed."""
    table = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "—": "-", "–": "-"})
    text = unicodedata.normalize("NFKC", text).translate(table).replace("---", "-")
    return " ".join(text.replace("--", "-").split())


MISSING = [tool for tool in ("xelatex", "pandoc") if shutil.which(tool) is None]


def contents_text(result: book.BookResult) -> tuple[str, str]:
    """(table of contents, whole book) as text: pdftotext, else LaTeX's .toc file."""
    if (
        shutil.which("pdftotext") is None
    ):  # poppler-utils missing: check what LaTeX wrote
        toc = result.tex.with_suffix(".toc").read_text()
        entries = re.findall(r"\\numberline \{(\d+)\}(.*?)\}\{", toc)
        return normalize(" ".join(f"{n} {t}" for n, t in entries)), ""
    text = subprocess.run(
        ["pdftotext", "-layout", str(result.pdf), "-"], capture_output=True, text=True
    ).stdout
    pages = text.split("\f")
    contents = next(
        i for i, page in enumerate(pages) if re.search(r"^\s*Contents\s*$", page, re.M)
    )
    return normalize(" ".join(pages[contents : contents + 4])), text


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING),
    reason=f"building the book needs {' and '.join(MISSING)} (TeX Live's xelatex, "
    "pandoc), which are not installed; see the README",
)
def test_book_builds_from_committed_notebooks(tmp_path):
    chapters = book.find_chapters(book.DEFAULT_CHAPTERS)
    assert chapters, "no chapter notebooks committed under chapters/"
    result = book.build_book(book.DEFAULT_CHAPTERS, tmp_path, log=lambda _: None)

    assert result.pdf.is_file() and result.tex.is_file()
    assert [c.number for c in result.chapters] == [c.number for c in chapters]
    assert result.pages is not None and result.pages > len(result.chapters)

    toc, text = contents_text(result)
    for chapter in result.chapters:
        words = r"\s+".join(re.escape(w) for w in normalize(chapter.title).split())
        assert re.search(rf"\b{chapter.number}\s+{words}", toc), (
            f"chapter {chapter.number} {chapter.title!r} is not in the contents"
        )
    # pages per chapter: consecutive ranges that end on the book's last page
    ranges = [result.chapter_pages[c.number] for c in result.chapters]
    assert all(first <= last for first, last in ranges)
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:], strict=False))
    assert ranges[0][0] == 1 and ranges[-1][1] < result.pages
    assert result.fonts is not None and result.fonts.figures
    assert "figure fonts: smallest text" in result.summary()
    if text:
        # every captioned figure is numbered "Figure N.M" under its chapter's number
        captions = re.findall(r"Figure (\d+)\.\d+:", text)
        assert len(captions) == result.figures
        assert {int(n) for n in captions} <= {c.number for c in result.chapters}
        assert "NBVAL_" not in text
        # figures stay in their section: none floats past its chapter's References
        for chapter in result.chapters:
            heading = re.search(
                rf"^\s*{chapter.number}\.\d+\s+References\s*$", text, re.M
            )
            if heading is None:
                continue
            late = [
                m.group(0)
                for m in re.finditer(rf"Figure {chapter.number}\.\d+:", text)
                if m.start() > heading.start()
            ]
            assert not late, f"{late} printed after {chapter.number}'s References"


# ---------------------------------------------------------------------- inline code


def test_inline_code_breaks_after_path_separators_never_inside_names():
    texttt = re.compile(r"\\texttt\{((?:[^{}\\]|\\[_&%#$])+)\}")

    def breaks(latex: str) -> list[str]:
        code = texttt.sub(book.prepare._breakable_code, latex)
        return re.sub(r"^\\texttt\{|\}$", "", code).split("\\allowbreak{}")

    # names never break: not at "_", "(", ",", "=", nor inside a number
    for name in (
        r"\texttt{seed\_everything()}",
        r"\texttt{BOOK\_DATA\_MIRROR}",
        r"\texttt{load\_model(path, weights\_only=True)}",
        r"\texttt{x = 1.5 + 2.25 ...}",
    ):
        assert breaks(name) == [texttt.match(name).group(1)], name
    # long dotted and slashed paths break after their "." and "/" only
    assert breaks(r"\texttt{shared.plotting.use\_book\_style}") == [
        "shared.",
        "plotting.",
        r"use\_book\_style",
    ]
    assert breaks(r"\texttt{chapters/04\_pretraining/04\_pretraining.ipynb}") == [
        "chapters/",
        r"04\_pretraining/",
        r"04\_pretraining.",
        "ipynb",
    ]
    assert breaks(r"\texttt{torch.load(path, weights\_only=True)}") == [
        "torch.",
        r"load(path, weights\_only=True)",
    ]


# ---------------------------------------------------------------------- figure fonts


def figure_pdf(width_in: float, height_in: float, draw) -> bytes:
    """A matplotlib figure of exactly ``width_in`` x ``height_in`` inches, as PDF."""
    import io

    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"pdf.fonttype": 42}):
        fig = Figure(figsize=(width_in, height_in))
        ax = fig.add_subplot()
        draw(fig, ax)
        buf = io.BytesIO()
        fig.savefig(buf, format="pdf")
    return buf.getvalue()


def ticks_at(size: float):
    def draw(fig, ax):
        ax.plot([0, 1], [0, 1])
        ax.tick_params(labelsize=size)
        ax.set_xlabel("step", fontsize=size)
        ax.set_title("loss", fontsize=size)

    return draw


def measured(pdf: bytes):
    """(smallest size at print, all sizes at print) of a figure PDF in the book."""
    text = fonts.figure_text(pdf)
    scale = fonts.print_scale(text.width, text.height)
    sizes = {round(run.size * scale, 2) for run in text.runs}
    return min(sizes), sizes, scale


def test_page_geometry_is_read_from_the_template():
    page = fonts.book_page()
    mm = 72 / 25.4
    assert page.linewidth == pytest.approx(160 * mm)  # A4, 25 mm margins
    assert page.textheight == pytest.approx(247 * mm)
    assert page.max_figure_height == pytest.approx(0.7 * 247 * mm)
    # the lengths XeLaTeX reported in a build of the book: no warning
    log = "BOOK-GEOMETRY textwidth=455.24411pt textheight=702.78308pt\n"
    assert fonts.check_page_against_log(log) is None
    assert "fix book_page" in fonts.check_page_against_log(
        log.replace("455.24411", "400.0")
    )


def test_font_sizes_are_measured_at_print_size():
    # a full-width figure prints at scale 1: 5-pt text measures 5 pt and fails
    small = figure_pdf(6.0, 3.0, lambda fig, ax: fig.text(0.5, 0.5, "tiny", size=5))
    smallest, _, scale = measured(small)
    assert scale == 1.0 and smallest == pytest.approx(5.0, abs=0.05)
    assert smallest < fonts.MIN_PT
    # 9-pt labels, ticks and title pass
    smallest, sizes, _ = measured(figure_pdf(6.0, 3.0, ticks_at(9)))
    assert smallest == pytest.approx(9.0, abs=0.05) and max(sizes) < 9.05
    # twice as wide as the text: the book halves it, 10-pt text prints at 5 pt
    wide = fonts.book_page().linewidth / 72 * 2
    smallest, _, scale = measured(figure_pdf(wide, 3.0, ticks_at(10)))
    assert scale == pytest.approx(0.5)
    assert smallest == pytest.approx(5.0, abs=0.05)
    # a figure taller than FIGURE_MAX_HEIGHT is scaled by its height
    tall = fonts.book_page().max_figure_height / 72 * 2
    assert measured(figure_pdf(3.0, tall, ticks_at(10)))[2] == pytest.approx(0.5)


def test_rotated_and_math_text_is_measured_at_its_font_size():
    def rotated(fig, ax):
        ax.plot([0, 1], [0, 1])
        ax.tick_params(axis="x", labelsize=8, labelrotation=90)
        ax.tick_params(axis="y", labelsize=8, labelrotation=45)
        ax.set_ylabel("a long vertical label", fontsize=8)  # rotated 90 degrees

    text = fonts.figure_text(figure_pdf(6.0, 3.0, rotated))
    assert {round(run.size, 2) for run in text.runs} == {8.0}
    assert any(run.text == "a long vertical label" for run in text.runs)

    def math(fig, ax):
        ax.set_axis_off()
        fig.text(0.2, 0.5, r"$x^{2}$", size=10)

    sizes = sorted(r.size for r in fonts.figure_text(figure_pdf(6.0, 3.0, math)).runs)
    assert sizes[-1] == pytest.approx(10.0, abs=0.05)  # x
    assert sizes[0] < 8.0  # the superscript is smaller, and counts


def image_cell(pdf: bytes, caption: str | None = None, tags=()):
    data = {
        "application/pdf": base64.b64encode(pdf).decode(),
        "image/png": base64.b64encode(FAKE_PNG).decode(),
    }
    metadata = {"tags": list(tags)}
    if caption:
        metadata["caption"] = caption
    return new_code_cell(
        "plot()", metadata=metadata, outputs=[new_output("display_data", data=data)]
    )


def test_notebook_check_numbers_figures_as_the_book_and_skips_removed(tmp_path):
    small = figure_pdf(6.0, 3.0, lambda fig, ax: fig.text(0.5, 0.5, "tiny", size=5))
    fine = figure_pdf(6.0, 3.0, ticks_at(9))
    cells = [
        new_markdown_cell("# Attention"),
        image_cell(fine, "A first figure."),
        image_cell(small, "Not printed.", tags=["remove-output"]),
        image_cell(small, "Not printed either.", tags=["remove-cell"]),
        image_cell(small),  # printed, without a number
        image_cell(small, "The second figure."),
    ]
    path = tmp_path / "03_gpt" / "03_gpt.ipynb"
    path.parent.mkdir()
    nbformat.write(new_notebook(cells=cells), path)
    found = fonts.notebook_figures(path)
    assert [(f.label, f.cell_index) for f in found] == [
        ("Figure 3.1", 1),
        ("unnumbered image", 4),
        ("Figure 3.2", 5),
    ]
    report = fonts.check_notebooks([path])
    assert [f.label for f in report.failing] == ["unnumbered image", "Figure 3.2"]
    assert "FAIL  Figure 3.2" in report.text() and "'tiny'" in report.text()
    assert fonts.main([str(path)]) == 1
    # the same numbering as the book's
    chapter = book.Chapter(number=3, path=path)
    book.prepare_notebook(
        nbformat.read(path, as_version=4), chapter, tmp_path / "f", fake_md2latex
    )
    assert chapter.figures == 2


@pytest.fixture(scope="module")
def committed_chapters():
    """(chapter, notebook) of every committed chapter notebook."""
    chapters = book.find_chapters(book.DEFAULT_CHAPTERS)
    assert chapters, "no chapter notebooks committed under chapters/"
    return [(c, nbformat.read(c.path, as_version=4)) for c in chapters]


def test_every_printed_figure_text_is_at_least_7pt(committed_chapters):
    figures = [
        fig
        for chapter, nb in committed_chapters
        for fig in fonts.notebook_figures(chapter.path, chapter.number, nb=nb)
    ]
    report = fonts.FontReport(figures=figures)
    assert report.figures, "no figures measured"
    failing = report.failing
    if failing:
        pytest.fail(
            f"{len(failing)} of {len(figures)} printed images have text below "
            f"{fonts.MIN_PT:g} pt at print size (python -m tools.book.fonts):\n"
            + "\n".join(fig.line() for fig in failing)
            + "\n"
            + "\n".join(report.summary()),
            pytrace=False,
        )


# ---------------------------------------------------------------------- references

_FIGURE_REF = re.compile(
    r"\b(?:Figures?|Figs?\.)(?:\s|~|&nbsp;)+"
    r"(\d+\.\d+(?:\s*(?:,|and|&|to|–|—|--|-)\s*(?:(?:Figure|Fig\.)\s+)?\d+\.\d+)*)"
)


def figure_references(markdown: str) -> list[tuple[int, int]]:
    """(chapter, k) of every figure a text names: "Figure 4.3", "Figures 4.3 and
    4.4", "Figures 4.3–4.5" (a range names each figure in it)."""
    found = []
    for match in _FIGURE_REF.finditer(markdown):
        group = match.group(1)
        numbers = [(int(c), int(k)) for c, k in re.findall(r"(\d+)\.(\d+)", group)]
        seps = re.split(r"\d+\.\d+", group)[1:-1]
        found.append(numbers[0])
        for sep, prev, this in zip(seps, numbers[:-1], numbers[1:], strict=True):
            if re.search(r"–|—|-|\bto\b", sep) and prev[0] == this[0]:
                found += [(this[0], k) for k in range(prev[1] + 1, this[1])]
            found.append(this)
    return found


def test_figure_references_are_parsed():
    text = (
        "Figure 4.3 shows it; Figures 4.5 and 4.6 agree, Figures 2.1–2.3 too, "
        "as do Figures 1.1, 1.2 and 1.4 and Figures 7.2 to 7.3. See [Figure 0.1]."
    )
    assert figure_references(text) == [
        (4, 3),
        (4, 5),
        (4, 6),
        (2, 1),
        (2, 2),
        (2, 3),
        (1, 1),
        (1, 2),
        (1, 4),
        (7, 2),
        (7, 3),
        (0, 1),
    ]
    assert figure_references("in Table 4.3 and section 4.3") == []


def chapter_figure_refs(chapter, nb):
    """(figure number -> its cell index, figure -> indices of markdown cells naming
    it, references to figures that do not exist) for one printed chapter."""
    figure_cells: dict[int, int] = {}
    for image in book.prepare.printed_images(nb):
        if image.figure is not None:
            figure_cells.setdefault(image.figure, image.cell_index)
    printed = copy.deepcopy(nb)
    for i, cell in enumerate(printed.cells):
        cell.metadata["book_index"] = i
    refs: dict[int, list[int]] = {}
    for cell in book.prepare.remove_tagged(printed).cells:
        if cell.cell_type != "markdown":
            continue
        for c, k in figure_references(cell.source):
            if c == chapter.number:
                refs.setdefault(k, []).append(cell.metadata["book_index"])
    return figure_cells, refs


def test_figure_references_name_existing_figures(committed_chapters):
    counts = {
        chapter.number: len(chapter_figure_refs(chapter, nb)[0])
        for chapter, nb in committed_chapters
    }
    dangling = []
    for chapter, nb in committed_chapters:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "markdown":
                continue
            for c, k in figure_references(cell.source):
                if c in counts and not 1 <= k <= counts[c]:
                    dangling.append(
                        f"{chapter.path.name} cell #{i}: Figure {c}.{k} "
                        f"(chapter {c} has {counts[c]} figures)"
                    )
    assert not dangling, "references to figures that do not exist:\n" + "\n".join(
        dangling
    )


MIN_REFERENCED = 0.9  # share of the book's figures its text names by number
MAX_REF_DISTANCE = 3  # cells between a figure and its first reference


def test_figures_are_referenced_near_where_they_appear(committed_chapters):
    per_chapter, far, total, referenced = [], [], 0, 0
    for chapter, nb in committed_chapters:
        figure_cells, refs = chapter_figure_refs(chapter, nb)
        named = [k for k in figure_cells if k in refs]
        total += len(figure_cells)
        referenced += len(named)
        missing = [f"{chapter.number}.{k}" for k in figure_cells if k not in refs]
        per_chapter.append(
            f"  chapter {chapter.number}: {len(named)} of {len(figure_cells)} "
            f"referenced" + (f"; never named: {', '.join(missing)}" if missing else "")
        )
        for k in named:
            first, cell = min(refs[k]), figure_cells[k]
            if abs(first - cell) > MAX_REF_DISTANCE:
                far.append(
                    f"  Figure {chapter.number}.{k} (cell #{cell}, "
                    f"{chapter.path.name}): first named in cell #{first}, "
                    f"{abs(first - cell)} cells away"
                )
    share = referenced / total if total else 1.0
    problems = []
    if share < MIN_REFERENCED:
        problems.append(
            f"{referenced} of {total} figures ({share:.0%}) are named in the text; "
            f"at least {MIN_REFERENCED:.0%} wanted"
        )
    if far:
        problems.append(
            f"{len(far)} figure(s) sit more than {MAX_REF_DISTANCE} cells from their "
            "first reference:\n" + "\n".join(far)
        )
    if problems:
        pytest.fail("\n".join([*problems, "per chapter:", *per_chapter]), pytrace=False)
