"""Token-reduction baselines to compare dynvit against, at matched token counts or FLOPs.

Each ``patch_*`` function patches a live timm ``VisionTransformer`` in place (no new
parameters, timm's head and state-dict keys unchanged) and returns it:

- ``evit``: keep the tokens the class token attends to, fuse the rest (Liang et al. 2022).
- ``tome``: merge similar tokens by bipartite soft matching (Bolya et al. 2023).
- ``random``: drop random tokens at dynvit's stages and kept counts.
"""
from .evit import patch_evit
from .random_drop import patch_random
from .tome import patch_tome

__all__ = ["BASELINES", "patch_evit", "patch_random", "patch_tome"]

BASELINES = {
    "evit": patch_evit,
    "tome": patch_tome,
    "random": patch_random,
}
