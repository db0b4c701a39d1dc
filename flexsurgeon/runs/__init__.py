"""The run folder a fine-tuning run writes: ``layout`` (every file and folder name, defined once)
and ``log`` (the epoch log: written, read and cut back in one place).

May import: ``checkpoints`` and what it may import.
"""
