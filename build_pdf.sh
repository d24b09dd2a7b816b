#!/usr/bin/env bash
# Build the course book from every chapter notebook: build/book/llm-from-scratch.pdf
#
#   ./build_pdf.sh                    # from the notebooks' saved outputs
#   ./build_pdf.sh --execute          # re-run every notebook first (BOOK_MODE, default laptop),
#                                     # in a temporary copy: the committed files are not touched
#   ./build_pdf.sh --execute --mode smoke
#
# Needs xelatex (TeX Live), pandoc and poppler-utils; see the README. The LaTeX source is
# kept next to the PDF (build/book/llm-from-scratch.tex) for debugging. The build logic is
# in tools/book/ (python -m tools.book --help): build tooling, not part of shared/.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
        python=.venv/bin/python
    else
        python=$(command -v python3 || command -v python)
    fi
fi
exec "$python" -m tools.book "$@"
