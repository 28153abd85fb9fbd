"""State dicts with CTransPath's / Swin-T's published key names, random values, any width.

CTransPath (Wang et al. 2022) is timm 0.5.4's ``swin_tiny_patch4_window7_224`` whose patch
embedding is a convolutional stem, saved as ``{'model': state_dict}`` without a head:
``patch_embed.proj.{0: conv 3x3/2, 1: BatchNorm, 3: conv 3x3/2, 4: BatchNorm, 6: conv 1x1}``,
``patch_embed.norm``, ``layers.i.blocks.j.{norm1, attn.relative_position_bias_table,
attn.relative_position_index, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, the shifted
blocks' ``attn_mask`` buffer (for 224 px inputs), ``layers.i.downsample.{norm, reduction}`` for
stages 0..2 and ``norm``. Written out key by key here, independently of the model code, so a
renamed parameter fails the tests.
"""

from __future__ import annotations

import torch


def swin_layout(
    dim: int = 96,
    depths: tuple[int, ...] = (2, 2, 6, 2),
    head_dim: int = 32,
    window: int = 7,
    conv_stem: bool = True,
    image: int = 224,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state: dict[str, torch.Tensor] = {}
    if conv_stem:
        a, b = dim // 8, dim // 4
        state["patch_embed.proj.0.weight"] = r(a, 3, 3, 3, scale=0.3)
        for idx, ch in ((1, a), (4, b)):
            p = f"patch_embed.proj.{idx}."
            state |= {
                p + "weight": 1 + r(ch),
                p + "bias": r(ch),
                p + "running_mean": r(ch),
                p + "running_var": 1 + r(ch).abs(),
                p + "num_batches_tracked": torch.tensor(1000),
            }
        state["patch_embed.proj.3.weight"] = r(b, a, 3, 3, scale=0.1)
        state["patch_embed.proj.6.weight"] = r(dim, b, 1, 1, scale=0.1)
        state["patch_embed.proj.6.bias"] = r(dim)
    else:
        state["patch_embed.proj.weight"] = r(dim, 3, 4, 4)
        state["patch_embed.proj.bias"] = r(dim)
    state |= {"patch_embed.norm.weight": 1 + r(dim), "patch_embed.norm.bias": r(dim)}
    side = image // 4
    for i, depth in enumerate(depths):
        c, heads = dim * 2**i, dim * 2**i // head_dim
        w = min(window, side)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            state |= {
                p + "norm1.weight": 1 + r(c),
                p + "norm1.bias": r(c),
                p + "attn.relative_position_bias_table": r((2 * w - 1) ** 2, heads),
                p + "attn.relative_position_index": torch.zeros(w * w, w * w, dtype=torch.long),
                p + "attn.qkv.weight": r(3 * c, c),
                p + "attn.qkv.bias": r(3 * c),
                p + "attn.proj.weight": r(c, c),
                p + "attn.proj.bias": r(c),
                p + "norm2.weight": 1 + r(c),
                p + "norm2.bias": r(c),
                p + "mlp.fc1.weight": r(4 * c, c),
                p + "mlp.fc1.bias": r(4 * c),
                p + "mlp.fc2.weight": r(c, 4 * c),
                p + "mlp.fc2.bias": r(c),
            }
            if j % 2 and side > window:  # shifted block: the mask for the training size
                state[p + "attn_mask"] = torch.zeros((side // w) ** 2, w * w, w * w)
        if i < 3:
            p = f"layers.{i}.downsample."
            state |= {
                p + "norm.weight": 1 + r(4 * c),
                p + "norm.bias": r(4 * c),
                p + "reduction.weight": r(2 * c, 4 * c),
            }
        side //= 2
    state |= {"norm.weight": 1 + r(dim * 8), "norm.bias": r(dim * 8)}
    return state
