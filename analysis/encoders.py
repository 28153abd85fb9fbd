"""Patch encoders: ResNet50 (torchvision layout), the truncated ResNet50 of CLAM, and ViTs.

``ResNet50Trunc`` stops after ``layer3`` and average-pools to a 1024-d embedding. Its parameter
names are torchvision's, so an ImageNet ``resnet50`` weight file loads into it: ``layer4.*`` and
``fc.*`` are dropped, every other key must match exactly (see ``load_weights``).

Without a weight file ``build_encoder`` returns the *fallback teacher*: the same network
initialised from a fixed seed (He-normal convolutions, BatchNorm weight 1 / bias 0, running
statistics 0 / 1). It never sees a label. ``calibrate_batchnorm`` can then re-estimate the
BatchNorm statistics on unlabeled patches (MAGA does this on its 20x patches when no teacher
weights are given) so that activations stay well scaled through the 13 blocks.

A second family, ``VisionTransformer``, is configurable (``VitConfig``: patch size, depth,
width, heads, LayerScale ``ls1.gamma``/``ls2.gamma``, register tokens, class-token or mean
pooling) with timm's state-dict names. Named configurations: ``vit_tiny`` (ViT-Tiny/16),
``uni`` (UNI: ViT-L/16 with LayerScale, 1024-d) and ``phikon`` (ViT-B/16; Phikon's Hugging Face
checkpoint is renamed to timm's layout on load). Any other shape is a spec string such as
``vit:dim=384,depth=12,heads=6,registers=4,pool=mean`` or ``vit:uni,dim=64,depth=3,heads=4``.

A third, ``SwinTransformer`` (``SwinConfig``), has timm 0.5.4's Swin names: ``swin_t``
(Swin-T: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, patch 4) and ``ctranspath``
(Swin-T with CTransPath's convolutional stem, 768-d); other shapes as ``swin:dim=...``.

Extension point: ``register_encoder(name, factory)`` makes any ``nn.Module`` with
``embed_dim``, ``forward`` and ``forward_blocks`` (layer1..3 maps + pooled) usable by name in
extraction, MAGA and bundles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.errors import AnalysisError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FALLBACK_SEED = 0
BLOCK_NAMES = ("layer1", "layer2", "layer3", "pooled")
PRECISIONS = ("fp32", "bf16", "auto")


class WeightsMismatchError(AnalysisError):
    """A weight file does not fit the encoder it is loaded into."""


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution, as in torchvision."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != width:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    """torchvision's ResNet initialisation (He-normal fan-out convolutions, unit BatchNorm)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class _Stem(nn.Module):
    """conv1 / bn1 / relu / maxpool and layer1..layer3, shared by both networks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _make_layer(64, 64, 3, stride=1)
        self.layer2 = _make_layer(256, 128, 4, stride=2)
        self.layer3 = _make_layer(512, 256, 6, stride=2)

    def _blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        l1 = self.layer1(x)  # (B, 256, H/4, W/4)
        l2 = self.layer2(l1)  # (B, 512, H/8, W/8)
        l3 = self.layer3(l2)  # (B, 1024, H/16, W/16)
        return {"layer1": l1, "layer2": l2, "layer3": l3}


class ResNet50(_Stem):
    """The full torchvision-layout ResNet50 (25,557,032 parameters with the 1000-way fc)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.layer4 = _make_layer(1024, 512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l4 = self.layer4(self._blocks(x)["layer3"])  # (B, 2048, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(l4), 1))  # (B, num_classes)


class ResNet50Trunc(_Stem):
    """ResNet50 cut after layer3 + global average pooling: a 1024-d patch embedding."""

    embed_dim = 1024

    def __init__(self) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self)

    def forward_blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The maps MAGA aligns: layer1, layer2, layer3 and the pooled vector (B, 1024)."""
        blocks = self._blocks(x)
        blocks["pooled"] = torch.flatten(self.avgpool(blocks["layer3"]), 1)  # (B, 1024)
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(x)["pooled"]


def forward_blocks(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block outputs of a registered network (each one exposes ``forward_blocks``)."""
    return model.forward_blocks(x)  # type: ignore[operator]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D / heads)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(attended.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, H / patch, W / patch)


class _LayerScale(nn.Module):
    """Per-channel scale of a residual branch (timm's ``ls1``/``ls2`` with a ``gamma``)."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _VitBlock(nn.Module):
    """Pre-norm transformer block (timm's parameter names), optional LayerScale."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, layerscale: bool, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))  # (B, N, D)


@dataclass(frozen=True)
class VitConfig:
    """A Vision Transformer in timm's state-dict layout.

    ``pool``: ``"cls"`` (final ``norm``, class token: UNI, Phikon) or ``"mean"`` (mean of the
    patch tokens through ``fc_norm``, timm's ``global_pool='avg'``). ``registers``: extra
    ``reg_token`` tokens (ViT "with registers"); ``pos_prefix``: whether ``pos_embed`` also holds
    positions for the class and register tokens (timm's default) or only for patches
    (``no_embed_class``).
    """

    patch: int = 16
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    layerscale: bool = False
    registers: int = 0
    pool: str = "cls"
    pos_prefix: bool = True
    base_tokens: int = 14  # pos_embed grid side as stored (224 px / 16)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "mean"):
            raise AnalysisError(f"ViT pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.depth < 3 or self.dim % self.heads:
            raise AnalysisError(
                f"ViT needs depth >= 3 (MAGA taps 3 blocks) and dim divisible by heads; got "
                f"depth {self.depth}, dim {self.dim}, heads {self.heads}"
            )


UNI = VitConfig(dim=1024, depth=24, heads=16, layerscale=True)  # UNI: ViT-L/16, LayerScale
PHIKON = VitConfig(dim=768, depth=12, heads=12, eps=1e-12)  # Phikon: ViT-B/16 (iBOT)


class VisionTransformer(nn.Module):
    """A configurable ViT (see ``VitConfig``) whose parameter names are timm's.

    Position embeddings are resized bicubically to the input's token grid, so 64 px (4 x 4
    tokens at patch 16) and 256 px (16 x 16) inputs both work. For MAGA the patch tokens after
    blocks depth/3, 2 depth/3 and depth (as (B, D, h, w) maps) stand in for layer1..3, and the
    pooled embedding (class token or token mean) is ``pooled``.
    """

    def __init__(self, config: VitConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or VitConfig()
        self.embed_dim = dim = cfg.dim
        self.patch = cfg.patch
        self.block_taps = (cfg.depth // 3 - 1, 2 * cfg.depth // 3 - 1, cfg.depth - 1)
        self.patch_embed = _PatchEmbed(dim, cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.registers:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.registers, dim))
        self.n_prefix = 1 + cfg.registers
        n_pos = cfg.base_tokens**2 + (self.n_prefix if cfg.pos_prefix else 0)
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, dim) * 0.02)
        self.blocks = nn.ModuleList(
            _VitBlock(dim, cfg.heads, cfg.mlp_ratio, cfg.layerscale, cfg.eps)
            for _ in range(cfg.depth)
        )
        if cfg.pool == "cls":
            self.norm = nn.LayerNorm(dim, eps=cfg.eps)
        else:
            self.fc_norm = nn.LayerNorm(dim, eps=cfg.eps)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _pos(self, h: int, w: int) -> torch.Tensor:
        """(1, [prefix +] h*w, D) position embeddings for an h x w token grid."""
        n_pre = self.n_prefix if self.config.pos_prefix else 0
        prefix, grid = self.pos_embed[:, :n_pre], self.pos_embed[:, n_pre:]
        n = int(round(grid.shape[1] ** 0.5))
        if (h, w) != (n, n):
            grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, D, n, n)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # (1, h*w, D)
        return torch.cat([prefix, grid], dim=1)

    def forward_blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.patch_embed(x)  # (B, D, h, w)
        B, D, h, w = tokens.shape
        patches = tokens.flatten(2).transpose(1, 2)  # (B, h*w, D)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.config.registers:
            prefix.append(self.reg_token.expand(B, -1, -1))
        pos = self._pos(h, w)
        if self.config.pos_prefix:
            x = torch.cat([*prefix, patches], 1) + pos  # (B, prefix + h*w, D)
        else:
            x = torch.cat([*prefix, patches + pos], 1)
        out = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.block_taps:
                name = BLOCK_NAMES[self.block_taps.index(i)]
                grid = x[:, self.n_prefix :].transpose(1, 2)  # (B, D, h*w)
                out[name] = grid.reshape(B, D, h, w)
        if self.config.pool == "cls":
            out["pooled"] = self.norm(x)[:, 0]  # (B, D)
        else:
            out["pooled"] = self.fc_norm(x[:, self.n_prefix :].mean(1))  # (B, D)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(x)["pooled"]


class VitTiny(VisionTransformer):
    """ViT-Tiny/16 (192-d, 12 blocks, 3 heads), class-token pooling, no LayerScale."""

    def __init__(self) -> None:
        super().__init__(VitConfig())


def parse_vit_spec(name: str) -> VitConfig:
    """``vit:dim=384,depth=12,heads=6,patch=16,layerscale=1,registers=4,pool=mean`` -> config.

    Starts from ViT-Tiny/16's values; ``vit:uni,...`` or ``vit:phikon,...`` start from those.
    """
    fields = {f: type(getattr(VitConfig(), f)) for f in VitConfig.__dataclass_fields__}
    values: dict[str, Any] = {}
    base = VitConfig()
    for item in filter(None, name.removeprefix("vit:").split(",")):
        if "=" not in item and item in ("uni", "phikon"):
            base = UNI if item == "uni" else PHIKON
            continue
        key, _, raw = item.partition("=")
        key = key.strip()
        if key not in fields or not raw:
            raise AnalysisError(
                f"encoder {name!r}: {item!r} is not key=value with a key among {', '.join(fields)}"
            )
        kind = fields[key]
        try:
            values[key] = raw in ("1", "true", "yes") if kind is bool else kind(raw)
        except ValueError:
            raise AnalysisError(
                f"encoder {name!r}: {key}={raw!r} is not a {kind.__name__}"
            ) from None
    return replace(base, **values)


def hf_vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``ViTModel`` state dict (Phikon's layout) in timm's names.

    Separate query/key/value projections are stacked into ``qkv``; the pooler, classifier and
    the iBOT mask token are dropped (unused for patch embeddings).
    """
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    per_layer = {
        "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
    }
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
            continue
        if not key.startswith("encoder.layer."):
            continue  # pooler.*, classifier.*, embeddings.mask_token
        index, _, rest = key.removeprefix("encoder.layer.").partition(".")
        module, _, kind = rest.rpartition(".")
        if module in per_layer:
            out[f"blocks.{index}.{per_layer[module]}.{kind}"] = value
        elif module == "attention.attention.query":
            parts = [state[f"encoder.layer.{index}.attention.attention.{p}.{kind}"]
                     for p in ("query", "key", "value")]  # fmt: skip
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, 0)
        elif module not in ("attention.attention.key", "attention.attention.value"):
            out[key] = value  # unknown: reported as unexpected by load_weights
    return out


# --------------------------------------------------------------------------------------------
# Swin Transformer (Swin-T, CTransPath)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwinConfig:
    """A Swin Transformer in timm 0.5.4's state-dict layout (the layout of CTransPath's file).

    Stage ``i`` has ``dim * 2**i`` channels and ``dim * 2**i / head_dim`` heads; patch merging
    (``layers.i.downsample``) closes stages 0..2. ``stem``: ``"patch"`` (a 4 x 4 convolution,
    ``patch_embed.proj``, Swin-T) or ``"conv"`` (CTransPath's convolutional stem: two 3 x 3
    stride-2 convolutions with BatchNorm and ReLU, ``dim/8`` then ``dim/4`` channels, then a
    1 x 1 convolution to ``dim``: ``patch_embed.proj.{0,1,3,4,6}``).
    """

    dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    head_dim: int = 32
    window: int = 7
    mlp_ratio: float = 4.0
    stem: str = "patch"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "conv"):
            raise AnalysisError(f"Swin stem must be 'patch' or 'conv', got {self.stem!r}")
        if len(self.depths) != 4 or min(self.depths) < 1 or self.window < 1:
            raise AnalysisError(
                f"Swin needs 4 stages of >= 1 block and a window >= 1; got depths {self.depths}, "
                f"window {self.window}"
            )
        if self.dim % self.head_dim or (self.stem == "conv" and self.dim % 8):
            raise AnalysisError(
                f"Swin dim {self.dim} must be divisible by head_dim {self.head_dim} (and by 8 "
                "with the conv stem)"
            )

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(self.dim * 2**i // self.head_dim for i in range(4))


SWIN_T = SwinConfig()  # embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, patch 4
CTRANSPATH = SwinConfig(stem="conv")  # Swin-T with CTransPath's convolutional stem


class _ConvStem(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        a, b = dim // 8, dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(3, a, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(a),
            nn.ReLU(inplace=True),
            nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(b),
            nn.ReLU(inplace=True),
            nn.Conv2d(b, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, H / 4, W / 4)


def _window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of w -> (B * windows, w*w, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def _window_merge(x: torch.Tensor, w: int, B: int, H: int, W: int) -> torch.Tensor:
    """Inverse of ``_window_partition``: (B * windows, w*w, C) -> (B, H, W, C)."""
    x = x.view(B, H // w, W // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, -1)


class _WindowAttention(nn.Module):
    """Multi-head attention inside windows with a learned relative position bias (timm names)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def bias(self, w: int) -> torch.Tensor:
        """(heads, w*w, w*w) bias for a w x w window (w <= the trained window: a sub-table)."""
        coords = torch.stack(
            torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
        ).flatten(1)  # (2, w*w)
        rel = coords[:, :, None] - coords[:, None, :] + self.window - 1  # (2, w*w, w*w)
        index = (rel[0] * (2 * self.window - 1) + rel[1]).to(
            self.relative_position_bias_table.device
        )
        return self.relative_position_bias_table[index].permute(2, 0, 1)

    def forward(self, x: torch.Tensor, w: int, mask: torch.Tensor | None) -> torch.Tensor:
        Bw, N, C = x.shape  # (B * windows, w*w, C)
        qkv = self.qkv(x).view(Bw, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B * windows, heads, N, C / heads)
        bias = self.bias(w).to(q.dtype)[None]  # (1, heads, N, N)
        if mask is not None:  # (windows, N, N): -100 between tokens of different shifted regions
            nW = mask.shape[0]
            bias = (bias + mask[:, None].to(q.dtype)).repeat(Bw // nW, 1, 1, 1)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(attended.transpose(1, 2).reshape(Bw, N, C))


def _shift_mask(Hp: int, Wp: int, w: int, shift: int, device: torch.device) -> torch.Tensor:
    """(windows, w*w, w*w) additive mask: tokens rolled in from the far edge do not mix."""
    region = torch.zeros(1, Hp, Wp, 1, device=device)
    cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    for n, (hs, ws) in enumerate((h, v) for h in cuts for v in cuts):
        region[:, hs, ws] = n
    ids = _window_partition(region, w).squeeze(-1)  # (windows, w*w)
    same = ids[:, :, None] == ids[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, -100.0)


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shifted: bool, cfg: SwinConfig) -> None:
        super().__init__()
        self.window, self.shifted = window, shifted
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps)
        self.attn = _WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps)
        self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        # as timm: a map no larger than the window is one window, unshifted
        w = min(self.window, H, W)
        shift = self.window // 2 if self.shifted and min(H, W) > self.window else 0
        y = self.norm1(x)
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        # as timm: after the shift, zero tokens fill the map to whole windows; the shift mask is
        # laid out on the padded map
        Hp, Wp = -(-H // w) * w, -(-W // w) * w
        y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))
        mask = _shift_mask(Hp, Wp, w, shift, x.device) if shift else None
        y = self.attn(_window_partition(y, w), w, mask)
        y = _window_merge(y, w, B, Hp, Wp)[:, :H, :W]
        if shift:
            y = torch.roll(y, (shift, shift), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))  # (B, H, W, C)


class _PatchMerging(nn.Module):
    """2 x 2 neighbours concatenated (timm's order), LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, -1)))  # (B, H/2, W/2, 2C)


class _SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, merge: bool, cfg: SwinConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _SwinBlock(dim, heads, cfg.window, i % 2 == 1, cfg) for i in range(depth)
        )
        self.downsample: nn.Module = _PatchMerging(dim, cfg.eps) if merge else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x  # (B, h, w, C), before patch merging


class _SwinPatchEmbed(nn.Module):
    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        if cfg.stem == "conv":
            self.proj: nn.Module = _ConvStem(cfg.dim).proj
        else:
            self.proj = nn.Conv2d(3, cfg.dim, 4, stride=4)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/4, W/4, D)


class SwinTransformer(nn.Module):
    """Swin-T (or any ``SwinConfig``) with timm's parameter names; 8 x dim pooled output.

    Any input that is a multiple of 4 px works: feature maps are zero-padded to whole windows,
    and a map no larger than the window is a single unshifted window of its own size (the bias
    comes from the matching part of the learned table), so a 64 px 5x patch (16, 8, 4, 2
    tokens per side over the stages) runs as well as 224 or 256 px. For MAGA the outputs of
    stages 1, 2 and 3 (H/8, H/16, H/32) are layer1..3 and the mean of the final-normed tokens of
    the last stage is ``pooled``.
    """

    def __init__(self, config: SwinConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SwinConfig()
        self.embed_dim = cfg.dim * 8
        self.patch_embed = _SwinPatchEmbed(cfg)
        self.layers = nn.ModuleList(
            _SwinStage(cfg.dim * 2**i, depth, heads, i < 3, cfg)
            for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.heads, strict=True))
        )
        self.norm = nn.LayerNorm(self.embed_dim, eps=cfg.eps)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_blocks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)  # (B, H/4, W/4, D)
        out = {}
        for i, stage in enumerate(cast(list[_SwinStage], list(self.layers))):
            x = stage(x)
            if i >= 1:
                out[BLOCK_NAMES[i - 1]] = x.permute(0, 3, 1, 2)  # (B, C_i, h_i, w_i)
            x = stage.downsample(x)  # stages 0..2: (B, h/2, w/2, 2C); stage 3: identity
        out["pooled"] = self.norm(x).mean((1, 2))  # (B, 8 D)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(x)["pooled"]


def parse_swin_spec(name: str) -> SwinConfig:
    """``swin:ctranspath,dim=16,head_dim=8,depths=2-2-2-2,window=7,stem=conv`` -> config.

    Starts from Swin-T (patch stem); ``swin:ctranspath,...`` starts from CTransPath.
    """
    base, values = SWIN_T, dict[str, Any]()
    for item in filter(None, (s.strip() for s in name.removeprefix("swin:").split(","))):
        if item in ("swin_t", "ctranspath"):
            base = SWIN_T if item == "swin_t" else CTRANSPATH
            continue
        key, _, raw = item.partition("=")
        try:
            if key in ("dim", "head_dim", "window"):
                values[key] = int(raw)
            elif key == "depths":
                values[key] = tuple(int(d) for d in raw.split("-"))
            elif key == "stem":
                values[key] = raw
            else:
                raise AnalysisError(
                    f"encoder {name!r}: {item!r} is not key=value with a key among dim, "
                    "head_dim, depths (e.g. 2-2-6-2), window, stem"
                )
        except ValueError:
            raise AnalysisError(f"encoder {name!r}: {item!r} is not a number") from None
    return replace(base, **values)


SWIN_DERIVED = ("relative_position_index", "attn_mask")  # buffers timm 0.5.4 saves; recomputed


def timm_swin_to_local(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the derived Swin buffers; newer timm's layout (merging at the start of stages
    1..3, ``layers.i.downsample``) is moved to the end of the stage before, as timm 0.5.4."""
    state = {k: v for k, v in state.items() if not k.endswith(SWIN_DERIVED)}
    if any(k.startswith("layers.3.downsample.") for k in state):
        moved = {}
        for k, v in state.items():
            if k.startswith("layers.") and ".downsample." in k:
                i, _, rest = k.removeprefix("layers.").partition(".")
                k = f"layers.{int(i) - 1}.{rest}"
            moved[k] = v
        state = moved
    return state


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.pt`` file (loaded with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMismatchError(f"weight file {path} does not exist: check the path")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user problem
        raise WeightsMismatchError(
            f"cannot read weight file {path} ({exc}); expected a .safetensors or .pth state dict"
        ) from exc
    for wrapper in ("state_dict", "model"):  # Lightning-style files; CTransPath's {'model': ...}
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsMismatchError(f"weight file {path} does not hold a flat state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict strictly; a full ResNet50 file may load into ``ResNet50Trunc``.

    Keys ``layer4.*``, ``fc.*``, ``head.*`` and ``mask_token`` are dropped when the model has no
    such modules (torchvision ImageNet files into the truncated network, classifier heads and
    masked-pretraining tokens of ViT files). ``num_batches_tracked`` may be absent (old
    torchvision files). A Hugging Face ViT file (Phikon) is renamed to timm's layout first; a
    Swin file loses its derived buffers (``relative_position_index``, ``attn_mask``) and newer
    timm's merging position is moved to 0.5.4's (``timm_swin_to_local``). Anything else missing or unexpected, or any shape mismatch, raises
    ``WeightsMismatchError`` naming the keys.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    if isinstance(model, VisionTransformer) and any(k.startswith(HF_VIT_KEYS) for k in state):
        state = hf_vit_to_timm(state)  # a Hugging Face ViTModel file (Phikon)
    if isinstance(model, SwinTransformer):
        state = timm_swin_to_local(state)
    for prefix in ("layer4.", "fc.", "head.", "mask_token"):  # mask_token: masked pretraining
        if not any(k.startswith(prefix) for k in own):
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise WeightsMismatchError(
            f"weight file {path} does not fit {type(model).__name__}: "
            + _describe_keys("missing", missing)
            + _describe_keys("unexpected", unexpected)
            + _describe_keys("wrong shape", wrong_shape)
            + _layout_hint(model)
        )
    model.load_state_dict(state, strict=False)
    return model


HF_VIT_KEYS = ("embeddings.", "encoder.layer.", "vit.embeddings.")


def _layout_hint(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer):
        c = model.config
        return (
            f"this encoder is a timm-layout ViT (patch {c.patch}, dim {c.dim}, depth {c.depth}, "
            f"layerscale {c.layerscale}, registers {c.registers}, pool {c.pool}); pick the "
            "--encoder that matches the checkpoint ('uni' for UNI ViT-L/16, 'phikon' for Phikon, "
            "or vit:dim=...,depth=...)"
        )
    if isinstance(model, SwinTransformer):
        sc = model.config
        return (
            f"this encoder is a timm-layout Swin (dim {sc.dim}, depths {sc.depths}, window "
            f"{sc.window}, {sc.stem} stem); pick the --encoder that matches the checkpoint "
            "('ctranspath' for CTransPath, 'swin_t' for Swin-T, or swin:dim=...)"
        )
    if hasattr(model, "forward_blocks") and not isinstance(model, _Stem):
        return f"use a state dict saved from {type(model).__name__}"
    return "use a torchvision-layout ResNet50 state dict"


def _describe_keys(kind: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    return f"{len(keys)} {kind} key(s): {shown}; "


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the model's state dict as safetensors (contiguous CPU tensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate BatchNorm running statistics as the plain average over unlabeled batches.

    Only running means/variances change; no parameter is trained. The model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches seen
    model.train()
    for batch in batches:
        model(batch)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


# --------------------------------------------------------------------------------------------
# Encoder wrapper
# --------------------------------------------------------------------------------------------


def imagenet_normalize(patches_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 with ImageNet mean/std."""
    if isinstance(patches_uint8, np.ndarray) and not patches_uint8.flags.writeable:
        patches_uint8 = np.array(patches_uint8)  # read-only memmaps: torch wants writable memory
    x = torch.as_tensor(patches_uint8)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected patches shaped (N, H, W, 3), got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def fast_bf16_available(device: str) -> bool:
    """bf16 pays off on CUDA with bf16 support and on CPUs with AMX or AVX512-BF16."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def default_device() -> str:
    """``$LOWMAG_DEVICE`` when set, else cuda when torch sees a GPU (``analysis.devices``)."""
    from analysis.devices import resolve_device

    return resolve_device(None)


@dataclass
class Encoder:
    """A patch encoder ready for inference: normalisation, batching, precision, device."""

    name: str
    model: nn.Module
    dim: int
    weights_source: str  # the weight file, or "seeded-init(seed=0)" for the fallback teacher
    precision: str = "fp32"  # 'fp32' | 'bf16' | 'auto' (bf16 where the hardware has a fast path)
    channels_last: bool | None = None  # None: on whenever bf16 is used
    device: str = field(default_factory=default_device)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.model.eval().to(self.device)
        if self.use_channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @property
    def use_bf16(self) -> bool:
        if self.precision == "auto":
            return fast_bf16_available(self.device)
        return self.precision == "bf16"

    @property
    def use_channels_last(self) -> bool:
        return self.use_bf16 if self.channels_last is None else self.channels_last

    def embed(self, patches_uint8: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 patches -> (N, dim) float32 embeddings.

        Patches go through the network ``batch_size`` at a time. When the device runs out of
        memory (``analysis.devices.is_out_of_memory``: CUDA, CPU, MPS) the batch is halved (and
        stays halved for later calls) until it fits; a single patch that does not fit is an
        ``AnalysisError``. Each patch's embedding does not depend on its batch-mates, so the
        result is the same.
        """
        from analysis.devices import is_out_of_memory, release_cached_memory

        n = len(patches_uint8)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        start = 0
        while start < n:
            size = min(self.batch_size, n - start)
            try:
                out.append(
                    self.embed_tensor(imagenet_normalize(patches_uint8[start : start + size]))
                )
            except RuntimeError as exc:  # torch.OutOfMemoryError is one; CPU and MPS say so
                if not is_out_of_memory(exc):
                    raise
                release_cached_memory(self.device)
                if size == 1:
                    side = "x".join(str(v) for v in np.shape(patches_uint8)[1:3])
                    raise AnalysisError(
                        f"one {side} px patch does not fit in the memory of {self.device} for "
                        f"the {self.name} encoder ({str(exc).splitlines()[0][:160]}); free the "
                        "device or run on another one (LOWMAG_DEVICE)"
                    ) from None
                self.batch_size = max(1, size // 2)
                continue
            start += size
        return torch.cat(out).numpy()

    def blocks(self, patches_uint8: np.ndarray) -> dict[str, torch.Tensor]:
        """Intermediate block outputs (float32, CPU) of one batch; see ``forward_blocks``."""
        out = self._run(imagenet_normalize(patches_uint8), lambda x: forward_blocks(self.model, x))
        return {k: v.float().cpu() for k, v in out.items()}

    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised float -> (B, dim) float32 on CPU."""
        return self._run(x, self.model).float().cpu()

    def _run(self, x: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> Any:
        x = x.to(self.device)
        if self.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with (
            torch.inference_mode(),
            torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.use_bf16),
        ):
            return fn(x)


def _resnet50_trunc() -> ResNet50Trunc:
    return ResNet50Trunc()


ENCODERS: dict[str, Callable[[], nn.Module]] = {
    "resnet50_trunc": _resnet50_trunc,
    "vit_tiny": VitTiny,
    "uni": lambda: VisionTransformer(UNI),
    "phikon": lambda: VisionTransformer(PHIKON),
    "swin_t": lambda: SwinTransformer(SWIN_T),
    "ctranspath": lambda: SwinTransformer(CTRANSPATH),
}


def register_encoder(name: str, factory: Callable[[], nn.Module]) -> None:
    """Make any patch encoder usable by name (``build_encoder``, ``lowmag extract``, MAGA).

    ``factory()`` returns an ``nn.Module`` with:
    - ``embed_dim``: the size of the patch embedding;
    - ``forward(x)``: (B, 3, H, W) ImageNet-normalised -> (B, embed_dim);
    - ``forward_blocks(x)``: a dict with ``layer1``, ``layer2``, ``layer3`` (B, C_i, h_i, w_i)
      feature maps from shallow to deep and ``pooled`` (B, embed_dim), the maps MAGA aligns
      (the teacher's maps are average-pooled to the student's sizes);
    - a state dict that ``load_weights`` can fill strictly from a safetensors or ``.pth`` file.
    Names are process-wide: register before building bundles or models that use the name.
    """
    if name in ENCODERS or name.startswith(("vit:", "swin:")):
        raise AnalysisError(f"encoder name {name!r} is taken")
    ENCODERS[name] = factory


def build_model(
    name: str, weights: str | Path | None = None, seed: int = FALLBACK_SEED
) -> nn.Module:
    """The bare network; without ``weights`` the deterministic seeded fallback initialisation.

    ``name`` is a registered encoder or a ViT spec such as ``vit:dim=384,depth=12,heads=6``
    (see ``parse_vit_spec``).
    """
    factory: Callable[[], nn.Module]
    if name.startswith("vit:"):
        config = parse_vit_spec(name)
        factory = lambda: VisionTransformer(config)  # noqa: E731
    elif name.startswith("swin:"):
        swin = parse_swin_spec(name)
        factory = lambda: SwinTransformer(swin)  # noqa: E731
    elif name in ENCODERS:
        factory = ENCODERS[name]
    else:
        raise AnalysisError(
            f"unknown encoder {name!r}; known encoders: {', '.join(ENCODERS)}, vit:key=value,... or "
            "swin:key=value,..."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def build_encoder(
    name: str = "resnet50_trunc",
    weights: str | Path | None = None,
    precision: str = "fp32",
    device: str | None = None,
    batch_size: int = 64,
    channels_last: bool | None = None,
) -> Encoder:
    """An ``Encoder`` from the registry; see the module docstring for the no-weights fallback."""
    model = build_model(name, weights)
    return Encoder(
        name=name,
        model=model,
        dim=int(model.embed_dim),  # type: ignore[arg-type]
        weights_source=str(weights) if weights else f"seeded-init(seed={FALLBACK_SEED})",
        precision=precision,
        channels_last=channels_last,
        device=device or default_device(),
        batch_size=batch_size,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
