"""Which patch size each HNF layer uses, from data.image_size, hnf.layers, hnf.patch_sizes
and hnf.stem. Pure integer arithmetic without torch, so ``multifusion.core.config`` can check
params.yaml with it before any stage does work (``multifusion.model.patch_embed`` builds
the tokens at these sizes).
"""

from __future__ import annotations

PYRAMID_STRIDES = (32, 16, 8, 4)  # the pyramid backbone's levels, coarse to fine


def derive_patch_sizes(image_size: int, layers: int, patch_sizes: list[int] | None, stem: str = "conv") -> list[int]:
    """Patch size of each HNF layer, coarse to fine.

    Given ``hnf.patch_sizes``: checked (one per layer, each dividing data.image_size; with
    the pyramid stem each one of its level strides 32, 16, 8, 4).
    Derived, pyramid stem: the first ``layers`` levels from the coarsest, [32, 16, 8, 4][:layers].
    Derived, conv/linear stems: the finest grid is 8 x 8 patches (16 x 16 for 4 layers), each coarser layer
    halves the grid: layers 1..4 at image 64 -> [8], [16, 8], [32, 16, 8], [32, 16, 8, 4].
    """
    if layers < 1:
        raise ValueError(f"hnf.layers must be >= 1, got {layers}; fix params.yaml")
    if patch_sizes is not None:
        if len(patch_sizes) != layers:
            raise ValueError(
                f"hnf.patch_sizes has {len(patch_sizes)} entries but hnf.layers is {layers}; "
                "give one patch size per layer or set hnf.patch_sizes: null"
            )
        sizes = list(patch_sizes)
        if stem == "pyramid" and any(p not in PYRAMID_STRIDES for p in sizes):
            raise ValueError(
                f"hnf.patch_sizes {sizes}: with hnf.stem pyramid each patch size must be one of the "
                f"backbone's strides {list(PYRAMID_STRIDES)}; fix params.yaml"
            )
        for p in sizes:
            if p < 1 or image_size % p:
                raise ValueError(
                    f"hnf.patch_sizes: patch size {p} does not divide data.image_size {image_size}; "
                    "change hnf.patch_sizes (or data.image_size)"
                )
        return sizes
    if stem == "pyramid":
        if layers > len(PYRAMID_STRIDES) or image_size % PYRAMID_STRIDES[0]:
            raise ValueError(
                f"hnf.stem pyramid needs hnf.layers <= {len(PYRAMID_STRIDES)} and data.image_size a multiple of "
                f"{PYRAMID_STRIDES[0]}, got layers={layers}, image_size={image_size}; fix params.yaml"
            )
        return list(PYRAMID_STRIDES[:layers])
    finest_grid = 8 * 2 ** max(0, layers - 3)
    grids = [finest_grid // 2 ** (layers - 1 - l) for l in range(layers)]
    for g in grids:
        if image_size % g:
            raise ValueError(
                f"data.image_size {image_size} is not divisible by the {g} x {g} patch grid derived for "
                f"hnf.layers={layers}; set data.image_size to a multiple of {max(grids)} or give hnf.patch_sizes"
            )
    return [image_size // g for g in grids]
