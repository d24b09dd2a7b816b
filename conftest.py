"""pytest configuration shared by unit tests and notebook tests (nbval).

The test run always uses the ``smoke`` mode: every notebook runs its whole code path
on tiny workloads. Kernels started by nbval inherit this environment.
"""

import os

os.environ["BOOK_MODE"] = "smoke"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_MININTERVAL", "5")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
