"""Swin stage with prompt injection (the "scale Swin transformer" of MANIQA, paper §2.2).

One stage works on a fixed ``grid × grid`` token map of width ``dim``. It holds ``n_layers``
residual layers; each layer is ``blocks_per_layer`` Swin blocks (window attention with a relative
position bias; every second block shifts the windows by ``window // 2`` and masks attention across
the wrapped-around borders) followed by a 3 × 3 conv, and is wrapped in MANIQA's scaled residual
``x = scale · layer(x) + x``. Before every layer the stage adds ``FC(prompt)`` to all tokens (paper:
``y = x + FC_i(concat(p_dim, p_mod, p_reg, p_type))``), one FC per stage.

Everything is shape-static except the batch axis, so the stage exports to ONNX: the window
partition uses reshapes with ``-1`` for the batch, the shift is ``torch.roll`` and the mask and
bias index are buffers computed once at construction (non-persistent: they derive from the preset).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from timm.layers import DropPath, trunc_normal_

_MASK_VALUE = -100.0  # added to logits across shifted borders; exp(-100) underflows to 0 in fp16 too


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) → (B · nW, window², C), windows in row-major order."""
    _, h, w, c = x.shape
    x = x.reshape(-1, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of ``window_partition``: (B · nW, window², C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """(window², window²) int64 index into a ((2·window − 1)², heads) bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    flat = coords.flatten(1)                                   # (2, n)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)  # (n, n, 2), in [-(w-1), w-1]
    rel = rel + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(grid: int, window: int, shift: int) -> Tensor:
    """(nW, window², window²) float32: 0 within a region, ``_MASK_VALUE`` across regions.

    After rolling the map by ``-shift``, windows on the last row / column mix tokens from opposite
    borders of the image; tokens may only attend to tokens of the same original region.
    """
    region = torch.zeros(1, grid, grid, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)        # (nW, n)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, torch.tensor(_MASK_VALUE), torch.tensor(0.0))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Input (B · nW, window², C) float32; ``mask`` (nW, window², window²) or None.
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(window).reshape(-1), persistent=False)
        self.n = window * window

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        n, c = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                      # (Bw, heads, n, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.bias_table[self.bias_index].reshape(self.n, self.n, self.heads).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(-1, nw, self.heads, n, n) + mask[None, :, None]
            attn = attn.reshape(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(out)


class SwinBlock(nn.Module):
    """Pre-norm Swin block on (B, grid², C) tokens: (shifted) window attention + MLP, drop-path."""

    def __init__(self, dim: int, grid: int, heads: int, window: int, shift: int,
                 mlp_dim: int, drop_path: float) -> None:
        super().__init__()
        if window >= grid:  # one window covers the map: nothing to shift
            window, shift = grid, 0
        self.grid, self.window, self.shift = grid, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        mask = shifted_window_mask(grid, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        g, c = self.grid, x.shape[-1]
        y = self.norm1(x).reshape(-1, g, g, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), self.attn_mask)
        y = window_reverse(y, self.window, g, g)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(-1, g * g, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinLayer(nn.Module):
    """``depth`` Swin blocks (shift on odd blocks) followed by a 3 × 3 conv. (B, grid², C) → same."""

    def __init__(self, dim: int, grid: int, depth: int, heads: int, window: int,
                 mlp_dim: int, drop_paths: list[float]) -> None:
        super().__init__()
        self.grid = grid
        self.blocks = nn.ModuleList(
            SwinBlock(dim, grid, heads, window, (window // 2) if i % 2 else 0, mlp_dim, drop_paths[i])
            for i in range(depth)
        )
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        c = x.shape[-1]
        img = x.transpose(1, 2).reshape(-1, c, self.grid, self.grid)
        return self.conv(img).flatten(2).transpose(1, 2)


class SwinStage(nn.Module):
    """Prompted Swin stage: (B, C, grid, grid) features + (B, P) prompt → (B, C, grid, grid)."""

    def __init__(self, dim: int, grid: int, *, n_layers: int, blocks_per_layer: int, heads: int,
                 window: int, mlp_dim: int, prompt_dim: int, drop: float = 0.1,
                 drop_path: float = 0.1, residual_scale: float = 0.8) -> None:
        super().__init__()
        self.grid = grid
        self.residual_scale = residual_scale
        total = n_layers * blocks_per_layer
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        self.dropout = nn.Dropout(drop)
        self.prompt_proj = nn.Linear(prompt_dim, dim)
        self.layers = nn.ModuleList(
            SwinLayer(dim, grid, blocks_per_layer, heads, window, mlp_dim,
                      rates[i * blocks_per_layer:(i + 1) * blocks_per_layer])
            for i in range(n_layers)
        )

    def forward(self, x: Tensor, prompt: Tensor) -> Tensor:
        c = x.shape[1]
        p = self.prompt_proj(prompt).unsqueeze(1)            # (B, 1, C)
        t = self.dropout(x).flatten(2).transpose(1, 2)        # (B, grid², C)
        for layer in self.layers:
            t = t + p
            t = self.residual_scale * layer(t) + t
        return t.transpose(1, 2).reshape(-1, c, self.grid, self.grid)
