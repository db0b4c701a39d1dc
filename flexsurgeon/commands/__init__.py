"""What the commands do beyond convert and finetune, as library code: ``evaluate`` (``eval``),
``ablate`` (with ``stats`` for its intervals), ``export`` and ``publish`` (``push``, model cards).

May import: ``plotting``, ``training`` and everything below them.
"""
