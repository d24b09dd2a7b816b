"""Tests of the PDF book build (tools/book/).

Fast tests check the print preparation of notebooks without TeX; one test builds the
whole book from the committed chapter notebooks when xelatex and pandoc are installed.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import unicodedata

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tools import book

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
    if text:
        # every captioned figure is numbered "Figure N.M" under its chapter's number
        captions = re.findall(r"Figure (\d+)\.\d+:", text)
        assert len(captions) == result.figures
        assert {int(n) for n in captions} <= {c.number for c in result.chapters}
        assert "NBVAL_" not in text
