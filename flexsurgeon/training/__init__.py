"""Fine-tuning: ``recipe`` (the YAML recipe), ``setup`` (device, processes, seeds), ``run_data``
(a run's data), ``heads`` (the classifier and the added modules during training), ``batches`` and
``metrics`` (feeding and scoring), ``state`` (what ``--resume`` needs) and ``loop`` (``finetune``
and ``run``).

May import: ``data``, ``runs``, ``checkpoints``, ``surgery``, ``layers`` and the base modules.
"""
