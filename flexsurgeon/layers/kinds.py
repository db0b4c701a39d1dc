"""The global pool kinds a plan can install (no torch import: the CLI reads these for --help).

The kind is called ``pool`` everywhere: in the plan, the recipe, the CLI (``--pool``) and the layers.

``softmax`` and ``linear`` are FlexPool's two parametrisations. The others are fixed
baselines for ablations: on a spatial map ``avg`` (plain average pooling), ``lse`` and
``simpool`` (timm's LsePlus2d and SimPool2d); on a token sequence ``avg`` (the mean over the
patch tokens) and ``token`` (the class token).
"""

FLEXPOOL_KINDS = ("softmax", "linear")  # FlexPool's two parametrisations
SPATIAL_BASELINES = ("avg", "lse", "simpool")  # layers.pools.GlobalPool
TOKEN_BASELINES = ("avg", "token")  # layers.token_pool.TokenPool
BASELINE_POOLS = tuple(dict.fromkeys(SPATIAL_BASELINES + TOKEN_BASELINES))
POOL_KINDS = FLEXPOOL_KINDS + BASELINE_POOLS


def preserves(pool: str, reduction: str) -> bool:
    """Whether ``pool`` starts out equal to a source pool that reduced by ``reduction``
    ("mean": average pooling or a mean over tokens; "token": one token), so that a converted
    model keeps its function."""
    return pool in FLEXPOOL_KINDS or (pool, reduction) in (("avg", "mean"), ("token", "token"))
