"""The reference Wan2.1-style text-to-video DiT.

    latents [B, C, T, H, W] --patchify (1x2x2)--> tokens [B, L, dim]       (L = T' H' W', optionally 3D-tiled)
    timestep [B] --sinusoid, MLP--> t_emb [B, dim] --> t_mod [B, 6, dim]     (adaLN shift / scale / gate)
    text [B, Lt, text_dim] --MLP--> context [B, Lt, dim]
    N x block:  x += gate1 * SelfAttn(adaLN(x), RoPE)      <- the SLA site (``block.self_attn.core``)
                x += CrossAttn(LN(x), context)
                x += gate2 * MLP(adaLN(x))
    adaLN head --> Linear (``head_tokens``) --> unpatchify --> [B, C_out, T, H, W]

``forward`` is ``embed`` -> ``forward_blocks`` -> ``unembed``; a sequence-parallel wrapper shards
``DiTInputs.tokens`` and ``DiTInputs.rope`` along L between the first two and gathers before the last.
The parameters map one to one onto diffusers' WanTransformer3DModel (wan_weights.py loads its state_dict).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import DiTConfig
from .layers import MLP, CrossAttention, SelfAttention, modulate, timestep_features
from .rope import rope_tables
from .tiling import TokenTiling


class DiTBlock(nn.Module):
    """Self-attention, cross-attention and MLP with adaLN modulation from the timestep."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.mlp = MLP(dim, config.ffn_dim, config.mlp)
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, t_mod: torch.Tensor,
                context: torch.Tensor, seq_len: int | None = None, checkpointed: bool = False) -> torch.Tensor:
        """x [B, L, dim], RoPE tables [L, D / 2], t_mod [B, 6, dim], context [B, Lt, dim] -> [B, L, dim].
        ``seq_len``: valid tokens of the whole sequence when x is a tail-padded shard (see ``SelfAttention``).
        ``checkpointed``: recompute the block's activations in backward (when gradients are on). The checkpoint is
        taken here, inside the block, so that a compiled block (``apply_compile``) traces it with the block, as
        torchtitan compiles its checkpointed blocks: the compiler then plans the recomputation."""
        if checkpointed and torch.is_grad_enabled():
            return checkpoint(self.layers, x, cos, sin, t_mod, context, seq_len, use_reentrant=False)
        return self.layers(x, cos, sin, t_mod, context, seq_len)

    def layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, t_mod: torch.Tensor,
               context: torch.Tensor, seq_len: int | None) -> torch.Tensor:
        """The block's computation (``forward`` without the checkpoint)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + t_mod).chunk(6, dim=1)
        x = torch.addcmul(x, gate1, self.self_attn(modulate(self.norm1(x), shift1, scale1), cos, sin, seq_len))
        x = x + self.cross_attn(self.norm2(x), context)
        return torch.addcmul(x, gate2, self.mlp(modulate(self.norm3(x), shift2, scale2)))


@dataclass
class DiTInputs:
    """What the block stack consumes, after embedding; per-token tensors are split along L for sequence
    parallelism."""

    tokens: torch.Tensor
    """[B, L, dim] patch tokens (in tiled order when tiling is on)."""
    rope: tuple[torch.Tensor, torch.Tensor]
    """(cos, sin) [L, head_dim / 2], in the same token order as ``tokens``."""
    t_emb: torch.Tensor
    """[B, dim] timestep embedding (drives the head's modulation)."""
    t_mod: torch.Tensor
    """[B, 6, dim] per-block adaLN inputs."""
    context: torch.Tensor
    """[B, Lt, dim] projected text embeddings."""
    grid: tuple[int, int, int]
    """(T', H', W') token grid, for unpatchify."""
    tiling: TokenTiling | None
    """The permutation applied to tokens and tables, undone by ``unembed``."""


class VideoDiT(nn.Module):
    """Wan2.1-style text-to-video diffusion transformer with random initialisation; see the module docstring."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim, patch_channels = config.dim, config.in_channels * config.patch_volume
        self.patch_embed = nn.Linear(patch_channels, dim)
        self.text_embed = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                        nn.Linear(dim, dim))
        self.time_embed = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.head_norm = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.head = nn.Linear(dim, config.out_channels * config.patch_volume)
        self._layouts: dict = {}

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(T', H', W') of latents [B, C, T, H, W]; each of T, H, W must divide by the patch size."""
        if len(latent_shape) != 5 or latent_shape[1] != self.config.in_channels:
            raise ValueError(f"latents of shape {tuple(latent_shape)} are not [B, C={self.config.in_channels}, "
                             "T, H, W]")
        sizes, patch = latent_shape[2:], self.config.patch_size
        if any(s % p for s, p in zip(sizes, patch)):
            raise ValueError(f"latent sizes (T, H, W)={tuple(sizes)} do not divide by patch_size={patch}")
        return tuple(s // p for s, p in zip(sizes, patch))  # type: ignore[return-value]

    def _layout(self, grid: tuple[int, int, int], device: torch.device):
        """RoPE tables and tiling of one grid, cached in eager mode: they depend only on the shape. A compiled graph
        builds them itself (dynamo cannot trace ``is_inference_mode_enabled``, and a cache read would only add
        guards on the dict)."""
        compiling = torch.compiler.is_compiling()
        key = (grid, str(device))
        if not compiling and key in self._layouts:
            return self._layouts[key]
        cos, sin = rope_tables(grid, self.config.head_dim, self.config.rope_theta, device)
        tiling = None
        if self.config.tile_size is not None:
            tiling = TokenTiling.build(grid, self.config.tile_size, device)
            cos, sin = tiling.tile(cos, dim=0), tiling.tile(sin, dim=0)
        # Tensors made under inference_mode cannot be saved for a later backward, so those are not kept.
        if not compiling and not torch.is_inference_mode_enabled():
            self._layouts[key] = ((cos, sin), tiling)
        return (cos, sin), tiling

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, L, C * p_t * p_h * p_w], channel order (C, p_t, p_h, p_w) as a Conv3d's."""
        B, C = latents.shape[:2]
        (T, H, W), (pt, ph, pw) = self.token_grid(latents.shape), self.config.patch_size
        x = latents.view(B, C, T, pt, H, ph, W, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, T * H * W, C * pt * ph * pw)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, (p_t p_h p_w C_out)] -> [B, C_out, T, H, W] (Wan's head layout: patch offsets, then channels)."""
        B = x.shape[0]
        (T, H, W), (pt, ph, pw) = grid, self.config.patch_size
        x = x.view(B, T, H, W, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, -1, T * pt, H * ph, W * pw)

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> DiTInputs:
        """Latents [B, C, T, H, W], timesteps [B], text embeddings [B, Lt, text_dim] -> block-stack inputs."""
        if timestep.shape != (latents.shape[0],):
            raise ValueError(f"timestep of shape {tuple(timestep.shape)} must be [B={latents.shape[0]}]")
        if text.dim() != 3 or text.shape[0] != latents.shape[0] or text.shape[2] != self.config.text_dim:
            raise ValueError(f"text of shape {tuple(text.shape)} must be [B={latents.shape[0]}, Lt, "
                             f"text_dim={self.config.text_dim}]")
        grid = self.token_grid(latents.shape)
        rope, tiling = self._layout(grid, latents.device)
        tokens = self.patch_embed(self.patchify(latents))
        if tiling is not None:
            tokens = tiling.tile(tokens, dim=1)
        dtype = self.patch_embed.weight.dtype
        t_emb = self.time_embed(timestep_features(timestep, self.config.freq_dim).to(dtype))
        t_mod = self.time_mod(t_emb).unflatten(1, (6, -1))
        return DiTInputs(tokens, rope, t_emb, t_mod, self.text_embed(text.to(dtype)), grid, tiling)

    def forward_blocks(self, x: torch.Tensor, inputs: DiTInputs, seq_len: int | None = None) -> torch.Tensor:
        """Run the block stack on tokens ``x`` [B, L, dim], or on this rank's tail-padded L-shard of them with
        matching ``inputs.rope`` and ``seq_len`` the valid tokens of the whole sequence (sequence parallelism).

        ``seq_len`` is an argument of every block call rather than state set around the stack: activation
        checkpointing recomputes a block in backward, after this call has returned, from its arguments alone."""
        cos, sin = inputs.rope
        for block in self.blocks:
            x = block(x, cos, sin, inputs.t_mod, inputs.context, seq_len, self.config.checkpoint_blocks)
        return x

    def parameters_read_outside_forward(self) -> tuple[nn.Parameter, ...]:
        """Parameters read outside the forward of the module that owns them: training calls ``embed``,
        ``forward_blocks`` and ``head_tokens`` one by one (sequence parallelism shards the tokens between them), never
        this module's ``forward``, and ``embed`` reads ``patch_embed.weight``'s dtype. ZeRO-3 must gather them with
        the module whose forward runs those stages (``SLAStrategy`` registers them as its external parameters): left
        to DeepSpeed's detection on first access, the set depended on whether the parameter happened to be gathered at
        that moment, and a resumed run failed its second step (the recorded parameter trace no longer matched)."""
        return self.patch_embed.weight, self.head_modulation

    def head_tokens(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """The head on tokens: adaLN modulation from ``t_emb`` [B, dim], norm and projection of x [B, L, dim] (or an
        L-shard) -> [B, L, p_t p_h p_w C_out], in the tokens' order (no untiling, no unpatchify)."""
        shift, scale = (self.head_modulation + t_emb[:, None]).chunk(2, dim=1)
        return self.head(modulate(self.head_norm(x), shift, scale))

    def unembed(self, x: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        """Tokens [B, L, dim] -> predicted latents [B, C_out, T, H, W]: ``head_tokens``, untile, unpatchify."""
        x = self.head_tokens(x, inputs.t_emb)
        if inputs.tiling is not None:
            x = inputs.tiling.untile(x, dim=1)
        return self.unpatchify(x, inputs.grid)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, H, W], timesteps [B], text [B, Lt, text_dim] -> [B, C_out, T, H, W]."""
        inputs = self.embed(latents, timestep, text)
        return self.unembed(self.forward_blocks(inputs.tokens, inputs), inputs)
