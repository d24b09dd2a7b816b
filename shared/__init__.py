"""Reusable layers of the course *Building a Large Language Model from Scratch*.

One module per concept; notebooks import what they need, e.g.
``from shared.mode import get_mode`` or
``from shared.plotting import attention_heatmap``.
"""

__version__ = "0.1.0"
