"""State dicts with the published key names of pathology ViTs, random values, any width.

UNI (MahmoodLab): timm ``vit_large_patch16_224`` with LayerScale (``init_values``), no head:
``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1, attn.qkv, attn.proj,
ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm.*``. Phikon (Owkin): a Hugging Face
``ViTModel`` (``embeddings.*``, ``encoder.layer.N.attention.attention.{query,key,value}``, ...,
``layernorm.*``, ``pooler.dense.*``). Written out key by key here, independently of the model
code, so a renamed parameter fails the tests.
"""

from __future__ import annotations

import torch


def uni_layout(dim: int, depth: int, patch: int = 16, tokens: int = 14, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, tokens * tokens + 1, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": 1 + r(dim),
            b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim),
            b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim),
            b + "attn.proj.bias": r(dim),
            b + "ls1.gamma": 0.1 + r(dim),
            b + "norm2.weight": 1 + r(dim),
            b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim),
            b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim),
            b + "mlp.fc2.bias": r(dim),
            b + "ls2.gamma": 0.1 + r(dim),
        }
    state |= {"norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    return state


def phikon_layout(dim: int, depth: int, patch: int = 16, tokens: int = 14, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "embeddings.cls_token": r(1, 1, dim),
        "embeddings.mask_token": r(1, 1, dim),
        "embeddings.position_embeddings": r(1, tokens * tokens + 1, dim),
        "embeddings.patch_embeddings.projection.weight": r(dim, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": r(dim),
    }
    for i in range(depth):
        b = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state[b + f"attention.attention.{name}.weight"] = r(dim, dim)
            state[b + f"attention.attention.{name}.bias"] = r(dim)
        state |= {
            b + "attention.output.dense.weight": r(dim, dim),
            b + "attention.output.dense.bias": r(dim),
            b + "intermediate.dense.weight": r(4 * dim, dim),
            b + "intermediate.dense.bias": r(4 * dim),
            b + "output.dense.weight": r(dim, 4 * dim),
            b + "output.dense.bias": r(dim),
            b + "layernorm_before.weight": 1 + r(dim),
            b + "layernorm_before.bias": r(dim),
            b + "layernorm_after.weight": 1 + r(dim),
            b + "layernorm_after.bias": r(dim),
        }
    state |= {
        "layernorm.weight": 1 + r(dim),
        "layernorm.bias": r(dim),
        "pooler.dense.weight": r(dim, dim),
        "pooler.dense.bias": r(dim),
    }
    return state
