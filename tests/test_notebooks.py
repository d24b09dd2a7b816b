"""The house rules every chapter notebook must follow (BOOK.md, STYLE.md).

nbval checks that the notebooks *run*; these tests check that they are fit to be read
and printed: structure, captions, line length, saved outputs, exercises.
"""

import re
from pathlib import Path

import nbformat
import pytest

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"
NOTEBOOKS = sorted(CHAPTERS.glob("[0-9][0-9]_*/[0-9][0-9]_*.ipynb"))
MAX_LINE = 88


def markdown_headings(nb, level: int) -> list[str]:
    heads = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        in_fence = False
        for line in cell.source.splitlines():
            if line.lstrip().startswith("```"):
                in_fence = not in_fence
            elif not in_fence and re.match(rf"^#{{{level}}}\s", line):
                heads.append(line[level:].strip())
    return heads


def test_every_chapter_folder_has_its_main_notebook():
    folders = sorted(
        p for p in CHAPTERS.iterdir() if p.is_dir() and p.name[:2].isdigit()
    )
    assert folders, "no chapter folders found"
    for folder in folders:
        assert (folder / f"{folder.name}.ipynb").exists(), (
            f"{folder} lacks its notebook"
        )


@pytest.fixture(params=NOTEBOOKS, ids=[p.parent.name for p in NOTEBOOKS])
def nb_path(request):
    return request.param


def load(path):
    return nbformat.read(path, as_version=4)


def test_title_is_the_only_chapter_heading(nb_path):
    nb = load(nb_path)
    number = int(nb_path.parent.name[:2])
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert first.source.startswith(f"# Chapter {number} — "), first.source[:60]
    assert len(markdown_headings(nb, 1)) == 1, (
        "one '#' heading per notebook (the chapter)"
    )


def test_summary_and_exercises_with_solutions(nb_path):
    nb = load(nb_path)
    sections = " | ".join(markdown_headings(nb, 2))
    assert "Summary" in sections and "Exercises" in sections, sections
    assert any("solution" in c.metadata.get("tags", []) for c in nb.cells)


def test_code_lines_fit_the_printed_page(nb_path):
    nb = load(nb_path)
    long = [
        (i, line)
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if len(line) > MAX_LINE
    ]
    assert not long, f"code lines over {MAX_LINE} characters: {long[:3]}"


def test_committed_with_outputs_and_no_errors(nb_path):
    nb = load(nb_path)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    unexecuted = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not unexecuted, f"code cells never executed: {unexecuted[:5]}"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"saved error output: {errors[0].get('ename')}"


def test_every_figure_has_a_caption(nb_path):
    nb = load(nb_path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "remove-output" in cell.metadata.get("tags", []):
            continue
        has_image = any("image/png" in o.get("data", {}) for o in cell.outputs)
        if has_image:
            caption = cell.metadata.get("caption", "")
            assert len(caption) > 15, f"cell {i} draws a figure without a caption"


def test_at_least_one_attention_heatmap(nb_path):
    nb = load(nb_path)
    drawn = [
        c
        for c in nb.cells
        if c.cell_type == "code"
        and "attention_heatmap(" in c.source
        and any("image/png" in o.get("data", {}) for o in c.outputs)
    ]
    assert drawn, "every chapter shows an attention heatmap through the shared helper"


def test_widgets_have_a_static_fallback(nb_path):
    nb = load(nb_path)
    for i, cell in enumerate(nb.cells):
        if (
            cell.cell_type == "code"
            and "ipywidgets" in cell.source
            and ("interact" in cell.source or "widgets." in cell.source)
        ):
            tags = cell.metadata.get("tags", [])
            assert "remove-output" in tags or "remove-cell" in tags, (
                f"widget cell {i} must be tagged remove-output (static figure follows)"
            )
