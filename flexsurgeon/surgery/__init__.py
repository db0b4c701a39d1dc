"""Model surgery, in the order it runs: ``trace`` (torch.fx), ``shapes`` (which nodes are a mean),
``locate`` (nodes back to modules), ``analysis`` (pools and stages), ``plan`` (the plan record:
plain data, standard library only), ``planner`` (analysis -> plan), ``apply`` (carries a plan out
in the user's model, with ``rewrite`` for pools written as code and ``sac`` for the SAC heads),
``state`` (the plan a converted model carries), ``sources`` (building source models), ``convert``
(the pipeline and its output check) and ``costs`` (parameters and multiply-adds).

May import: ``layers`` and the base modules (``errors``, ``utils``).
"""
