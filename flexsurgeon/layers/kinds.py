"""The global pool kinds a plan can install (no torch import: the CLI reads these for --help).

The kind is called ``pool`` everywhere: in the plan, the recipe, the CLI (``--pool``) and the layers.

``softmax`` and ``linear`` are FlexPool's two parametrisations; ``avg`` (plain average
pooling), ``lse`` and ``simpool`` (timm's LsePlus2d and SimPool2d) are baselines for
ablations.
"""

FLEXPOOL_KINDS = ("softmax", "linear")  # FlexPool's two parametrisations
BASELINE_POOLS = ("avg", "lse", "simpool")
POOL_KINDS = FLEXPOOL_KINDS + BASELINE_POOLS
# Kinds that start out equal to average pooling, so a converted model keeps its function.
PRESERVING_KINDS = ("softmax", "linear", "avg")


