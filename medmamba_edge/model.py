"""MedMamba (Yue & Li, arXiv 2403.03849), re-implemented for inference anywhere.

Module and parameter names are the official ones (YubiaoYue/MedMamba, ``MedMamba.py``), so a
``state_dict`` saved by the official ``train.py`` loads with ``strict=True``. Differences that do not
touch the weights: the selective scan is our custom op (no ``mamba_ssm``, runs on CPU and exports to one
ONNX node), and nothing needs timm or einops. The official dropout and stochastic-depth rates are taken
(``drop_rate``, ``attn_drop_rate``, ``drop_path_rate``, with the official defaults) and act in training only.

Variants, as in the paper's table:

=========  ==============  ======================
variant    depths          dims
=========  ==============  ======================
medmamba_t [2, 2, 4, 2]    [96, 192, 384, 768]
medmamba_s [2, 2, 8, 2]    [96, 192, 384, 768]
medmamba_b [2, 2, 12, 2]   [128, 256, 512, 1024]
=========  ==============  ======================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medmamba_edge.runtime.scan_node import NUM_DIRECTIONS

from .scan import ss2d_scan_fn

VARIANTS: dict[str, dict[str, list[int]]] = {
    "medmamba_t": {"depths": [2, 2, 4, 2], "dims": [96, 192, 384, 768]},
    "medmamba_s": {"depths": [2, 2, 8, 2], "dims": [96, 192, 384, 768]},
    "medmamba_b": {"depths": [2, 2, 12, 2], "dims": [128, 256, 512, 1024]},
}


def variant_name(depths: Sequence[int], dims: Sequence[int]) -> str | None:
    for name, cfg in VARIANTS.items():
        if list(depths) == cfg["depths"] and list(dims) == cfg["dims"]:
            return name
    return None


class PatchEmbed2D(nn.Module):
    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging2D(nn.Module):
    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Odd sizes drop the last row/column, as the official code does (it also prints a warning each call).
        h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
        x = x[:, :h, :w]
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class DropPath(nn.Module):
    """Stochastic depth as timm's ``DropPath`` (the official block's): in training, a sample's branch is zeroed with
    probability ``drop_prob`` and the kept ones scaled by 1 / (1 − drop_prob); the identity in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        # As timm: the mask is scaled, not the branch (the official rounding), and not at rate 1, where 0 / 0 is NaN.
        return x * (mask / keep if keep > 0 else mask)


def _dropping(module_type, rate: float) -> nn.Module | None:
    """``module_type(rate)``, or None for a zero rate (as the official SS2D does for its dropout): even an identity
    submodule adds an entry to the version metadata every state_dict carries, so a model trained without dropping
    would save other bytes than it did before these rates were taken (the bundled checkpoint, train_bundled.py)."""
    return module_type(rate) if rate > 0 else None


class SS2D(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 2, dt_rank="auto",
                 conv_bias: bool = True, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        k = NUM_DIRECTIONS

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                groups=self.d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, self.d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, self.d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, self.d_inner))
        # S4D-real initialisation, as the official code: A = -[1..N] for every channel, D = 1.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * self.d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.Ds = nn.Parameter(torch.ones(k * self.d_inner))
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.dropout = _dropping(nn.Dropout, dropout)
        nn.init.trunc_normal_(self.x_proj_weight, std=0.02)
        nn.init.trunc_normal_(self.dt_projs_weight, std=0.02)
        nn.init.zeros_(self.dt_projs_bias)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """(b, d, h, w) → (b, h, w, d): the official four-direction scan, summed, as one SS2DScan node.

        The official code stacks the four orders of x, projects each (einsum with x_proj_weight), scans, and
        flips and transposes back. The projections act per position, so they are computed once on x as it is,
        for all four directions at once; the scan walks each direction's positions by index. The projection is
        a 1×1 convolution rather than a MatMul with the weight on the left: the same GEMM, but in the form
        quantizers and TensorRT treat as a constant-weight layer (per-output-channel INT8 scales).
        """
        b, d, h, w = x.shape
        x_dbl = F.conv2d(x, self.x_proj_weight.reshape(-1, d, 1, 1)).reshape(b, -1, h * w)
        return ss2d_scan_fn(x, x_dbl, self.dt_projs_weight, self.dt_projs_bias, -torch.exp(self.A_logs.float()),
                            self.Ds.float(), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in_proj as two projections, not one output split in two: exported, that split copies the whole output (2 %
        # of ONNX Runtime's time at 224; the GEMMs' work is the same). The weight is sliced, which the exporter folds
        # into constants; chunk() would leave a Split at run time, and quantizers skip a weight that is not constant.
        w, b, n = self.in_proj.weight, self.in_proj.bias, self.d_inner
        x, z = F.linear(x, w[:n], None if b is None else b[:n]), F.linear(x, w[n:], None if b is None else b[n:])
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.out_norm(self.forward_core(x)) * F.silu(z)
        out = self.out_proj(y)
        return out if self.dropout is None else self.dropout(out)


def concat_shuffled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The official ``channel_shuffle(torch.cat((a, b), -1), groups=2)``: channels interleaved a0 b0 a1 b1
    ..., built by stacking on a new last axis, which exports without the shuffle's Transpose."""
    return torch.stack((a, b), dim=-1).flatten(-2)


class SS_Conv_SSM(nn.Module):
    """Half the channels through a conv branch, half through SS2D, then shuffle and add the residual."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, norm_layer=nn.LayerNorm, attn_drop_rate: float = 0.0,
                 d_state: int = 16):
        super().__init__()
        half = hidden_dim // 2
        self.ln_1 = norm_layer(half)
        self.self_attention = SS2D(d_model=half, d_state=d_state, dropout=attn_drop_rate)
        self.drop_path = _dropping(DropPath, drop_path)
        self.conv33conv33conv11 = nn.Sequential(
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, kernel_size=1, stride=1),
            nn.ReLU(),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input_left, input_right = input.chunk(2, dim=-1)
        x = self.self_attention(self.ln_1(input_right))
        x = x if self.drop_path is None else self.drop_path(x)
        left = self.conv33conv33conv11(input_left.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return concat_shuffled(left, x) + input


class VSSLayer(nn.Module):
    def __init__(self, dim: int, depth: int, attn_drop: float = 0.0, drop_path: Sequence[float] | float = 0.0,
                 norm_layer=nn.LayerNorm, downsample=None, d_state: int = 16):
        super().__init__()
        self.dim = dim
        rates = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            [SS_Conv_SSM(hidden_dim=dim, drop_path=rates[i], norm_layer=norm_layer, attn_drop_rate=attn_drop,
                         d_state=d_state) for i in range(depth)]
        )
        self.downsample = downsample(dim=dim, norm_layer=norm_layer) if downsample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class VSSM(nn.Module):
    """MedMamba; the class name is the official one."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (2, 2, 4, 2), dims: Sequence[int] | int = (96, 192, 384, 768),
                 d_state: int | None = 16, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm, patch_norm: bool = True):
        super().__init__()
        depths = list(depths)
        if isinstance(dims, int):
            dims = [dims * 2**i for i in range(len(depths))]
        dims = list(dims)
        if len(dims) != len(depths):
            raise ValueError(f"depths {depths} and dims {dims} must have the same length")
        if any(d % 2 for d in dims):
            raise ValueError(f"every dim must be even (SS_Conv_SSM splits channels in half), got {dims}")
        for a, b in zip(dims, dims[1:]):
            if b != 2 * a:
                raise ValueError(f"each stage must double the width (PatchMerging2D), got dims {dims}")
        if d_state is None:  # the official code's "auto" state size (its 20240109 change)
            d_state = math.ceil(dims[0] / 6)
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.depths, self.dims = depths, dims
        self.embed_dim = dims[0]
        self.num_features = dims[-1]
        self.patch_size = patch_size
        self.in_chans = in_chans

        self.patch_embed = PatchEmbed2D(patch_size=patch_size, in_chans=in_chans, embed_dim=self.embed_dim,
                                        norm_layer=norm_layer if patch_norm else None)
        self.pos_drop = _dropping(nn.Dropout, drop_rate)
        # The official decay rule: rates rising linearly over all blocks, from 0 to drop_path_rate.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also when built on meta
        starts = [sum(depths[:i]) for i in range(self.num_layers + 1)]
        self.layers = nn.ModuleList(
            VSSLayer(dim=dims[i], depth=depths[i], attn_drop=attn_drop_rate, drop_path=rates[starts[i]:starts[i + 1]],
                     norm_layer=norm_layer, d_state=d_state, downsample=PatchMerging2D if i < self.num_layers - 1 else None)
            for i in range(self.num_layers)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def min_input_size(self) -> int:
        """Smallest square input for which every stage keeps at least one token."""
        return self.patch_size * 2 ** (self.num_layers - 1)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x if self.pos_drop is None else self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_backbone(x).permute(0, 3, 1, 2)
        x = torch.flatten(self.avgpool(x), start_dim=1)
        return self.head(x)


def _build(variant: str, num_classes: int, in_chans: int, **kwargs) -> VSSM:
    return VSSM(num_classes=num_classes, in_chans=in_chans, **VARIANTS[variant], **kwargs)


def medmamba_t(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VSSM:
    return _build("medmamba_t", num_classes, in_chans, **kwargs)


def medmamba_s(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VSSM:
    return _build("medmamba_s", num_classes, in_chans, **kwargs)


def medmamba_b(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VSSM:
    return _build("medmamba_b", num_classes, in_chans, **kwargs)
