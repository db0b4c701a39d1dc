"""Plain torch layers: FlexPool (``pools.py``, with the baseline pools and ``make_pool``), the SAC
head (``sac_head.py``), and the names of the pool kinds (``kinds.py``, no torch import).

May import: ``errors``, ``utils`` and torch/timm. Nothing here knows about graphs, plans or files.
"""
