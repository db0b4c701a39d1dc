"""Pictures: training curves, FlexPool weight maps and ablation figures (matplotlib, optional).

May import: ``training`` and everything below it.
"""
