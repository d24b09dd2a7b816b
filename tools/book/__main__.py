"""``python -m tools.book``: build the course book (what ``./build_pdf.sh`` runs)."""

import sys

from .build import main

sys.exit(main())
