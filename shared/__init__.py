"""Reusable layers of the course *Building a Large Language Model from Scratch*.

One module per concept; notebooks import what they need, e.g.
``from shared.mode import get_mode`` or
``from shared.plotting import attention_heatmap``.
"""

__version__ = "0.1.0"

import logging as _logging

# torchao (chapter 09's quantization library) is imported by transformers whenever
# it is installed, and on a CPU build of torch it logs one warning per CUDA extension
# it cannot load, plus a torch notice about an Enum it registers: noise in every
# notebook that imports transformers. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
