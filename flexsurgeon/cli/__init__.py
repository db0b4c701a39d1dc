"""The command line (click): ``main`` (the commands), ``options`` (shared options, one-line errors)
and ``report`` (every table and message it prints). The only place that writes text output.

May import: everything in flexsurgeon. Heavy imports happen inside the commands, so
``flexsurgeon --help`` does not import torch.
"""
