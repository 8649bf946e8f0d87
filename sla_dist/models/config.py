"""Typed configuration of the reference video DiT and its named shapes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MLP_KINDS = ("gelu", "swiglu")


@dataclass
class DiTConfig:
    """Shape and options of :class:`sla_dist.models.dit.VideoDiT` (a Wan2.1-style text-to-video DiT)."""

    dim: int = 1536
    """Hidden size of the token stream."""

    num_heads: int = 12
    """Attention heads; ``dim / num_heads`` is the head dim (the SLA kernels take 32, 64 or 128)."""

    num_layers: int = 30
    """Transformer blocks."""

    ffn_dim: int = 8960
    """Hidden size of each block's MLP (per branch for SwiGLU)."""

    text_dim: int = 4096
    """Channels of the text-encoder embeddings the model cross-attends to (umT5-XXL: 4096)."""

    in_channels: int = 16
    """Latent channels of the input video (Wan VAE: 16)."""

    out_channels: int = 16
    """Latent channels predicted."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch of latent voxels folded into one token."""

    freq_dim: int = 256
    """Channels of the sinusoidal timestep features."""

    mlp: str = "gelu"
    """MLP kind: 'gelu' (tanh-approximate GELU, as Wan) or 'swiglu'."""

    eps: float = 1e-6
    """Epsilon of the layer and RMS norms."""

    rope_theta: float = 10000.0
    """Base of the rotary position frequencies."""

    tile_size: tuple[int, int, int] | None = None
    """Reorder tokens into 3D tiles of this (t, h, w) size for the whole block stack (see tiling.py), so that an
    SLA block of ``prod(tile_size)`` tokens is a compact cube of the video; None keeps raster order."""

    checkpoint_blocks: bool = False
    """Recompute each block's activations in backward (per-block activation checkpointing)."""

    def __post_init__(self) -> None:
        for name in ("dim", "num_heads", "num_layers", "ffn_dim", "text_dim", "in_channels", "out_channels",
                     "freq_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.patch_size = _triple("patch_size", self.patch_size)
        if self.tile_size is not None:
            self.tile_size = _triple("tile_size", self.tile_size)
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} (dim={self.dim} / num_heads={self.num_heads}) must be even "
                             "and at least 6 so that 3D RoPE can split it over (t, h, w)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even (cos and sin halves)")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp={self.mlp!r} is not one of {MLP_KINDS}")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be positive")
        if not self.rope_theta > 1:
            raise ValueError(f"rope_theta={self.rope_theta} must exceed 1")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        p_t, p_h, p_w = self.patch_size
        return p_t * p_h * p_w


def train_flops_per_token(config: DiTConfig, seq_len: int, text_len: int = 0) -> float:
    """Model FLOPs of one training step (forward + backward = 3 forwards) per video token of a ``seq_len``-token
    sequence cross-attending to ``text_len`` text tokens: the matrix products of every block (projections, MLP,
    dense self- and cross-attention), as MFU counts them. SLA computes fewer attention FLOPs; MFU reports dense
    model FLOPs so that dense and sparse runs share one scale. Embeddings, norms and the head are left out."""
    d = config.dim
    mlp = (3 if config.mlp == "swiglu" else 2) * d * config.ffn_dim
    # multiply-accumulates per token and block: self q, k, v, o + cross q, o; attention scores and values
    macs = 6 * d * d + mlp + 2 * seq_len * d + 2 * text_len * d
    return 3 * 2 * macs * config.num_layers


def _triple(name: str, value) -> tuple[int, int, int]:
    value = tuple(value)
    if len(value) != 3 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{name}={value!r} must be three positive integers (t, h, w)")
    return value  # type: ignore[return-value]


DIT_CONFIGS: dict[str, DiTConfig] = {
    # CPU tests: head dim 32 is the smallest the SLA kernels take.
    "tiny": DiTConfig(dim=64, num_heads=2, num_layers=2, ffn_dim=128, text_dim=32, in_channels=4, out_channels=4,
                      freq_dim=32),
    # CPU studies and quick GPU runs.
    "small": DiTConfig(dim=512, num_heads=8, num_layers=8, ffn_dim=2048, text_dim=512),
    "wan2.1-1.3b": DiTConfig(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960, text_dim=4096),
    "wan2.1-14b": DiTConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824, text_dim=4096),
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """A named shape (``DIT_CONFIGS``) with field overrides, validated again."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; choose one of {sorted(DIT_CONFIGS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DiTConfig)}
    if unknown:
        raise ValueError(f"DiTConfig has no fields {sorted(unknown)}")
    return dataclasses.replace(DIT_CONFIGS[name], **overrides)
