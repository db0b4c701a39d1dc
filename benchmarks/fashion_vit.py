"""A small vision transformer for Fashion-MNIST: `benchmarks/fashion_vit.py:vit_fashion`.

timm's own ``VisionTransformer`` (the class `vit_small_patch16_224` is), sized for 28x28 gray
images: 4x4 patches (a 7x7 grid, 49 patch tokens after the class token), width 96, 6 blocks of
3 heads. The head reads the class token (timm's ``global_pool='token'``); `flexsurgeon convert`
replaces that with token FlexPool, started on the class token, and puts SAC heads after
blocks 1 and 3 (a third and two thirds of the depth).
"""
from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer


def vit_fashion(num_classes: int = 10, in_chans: int = 1, global_pool: str = "token") -> VisionTransformer:
    """The small ViT (defaults: Fashion-MNIST, 10 classes, one channel, class-token head)."""
    return VisionTransformer(img_size=28, patch_size=4, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0, global_pool=global_pool)
