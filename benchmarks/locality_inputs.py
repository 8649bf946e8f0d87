"""q / k / v with the locality of video DiT attention, for bench_sequence_parallel.py ``--locality``.

Tokens lie on a T x H x W latent-token grid and are put in the project's 3D-tiled order (sla_dist.models.tiling:
consecutive tokens form (4, 4, 4) cubes, so one 64-key SLA block is a compact piece of the video). Three sources:

    iid    i.i.d. Gaussian q, k, v: no locality at all, the worst case for context parallel's fetch.
    field  a synthetic model. Video content is smooth in space and time, and a trained DiT's queries and keys are
           functions of the content at each token, so a token's key resembles those of its neighbours and attention
           peaks on nearby, look-alike tokens. Modelled per head as q = S + n_q, k = S + n_k: S a Gaussian random
           field over the grid with correlation length ``correlation`` tokens (white noise on a grid coarser by that
           factor, upsampled trilinearly), the same for q and k (what a token looks for is what its look-alikes
           offer), n_q, n_k independent white noise of standard deviation ``noise`` (token-level detail); S has unit
           variance per channel. noise -> infinity is the i.i.d. case; correlation -> grid size is no locality left.
    dit    q and k captured at one self-attention layer of the project's own VideoDiT (after the q/k norms and 3D
           RoPE, in tiled order) on a spatially smooth synthetic video: random init (``qk_init`` 'tied' sets W_k = W_q
           so scores measure content similarity, as tiling_study.py) or the weights of a checkpoint (loaded with
           weights_only / safetensors, never executing code). v is Gaussian: it does not affect the fetch.
           ``latents`` 'gaussian' feeds i.i.d. Gaussian latents instead, as bench_dit_step.py times the model;
           ``tile`` (1, 1, 1) keeps raster order, as a VideoDiT without ``tile_size``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sla_dist.models import TokenTiling, VideoDiT, dit_config
from sla_dist.models.layers import DenseAttention
from tiling_study import smooth_latents, tie_query_key

LOCALITIES = ("iid", "field", "dit")
LATENTS = ("smooth", "gaussian")


@dataclass(frozen=True)
class LocalityConfig:
    """Where q / k come from and the token grid they sit on."""

    grid: tuple[int, int, int] = (32, 64, 64)
    """(T, H, W) latent tokens (after 1 x 2 x 2 patching); T H W is the sequence length."""
    tile: tuple[int, int, int] = (4, 4, 4)
    """3D tile of the token order (64 tokens: one key block)."""
    correlation: float = 8.0
    """'field': correlation length of the shared field, in tokens."""
    noise: float = 0.5
    """'field': standard deviation of the per-token noise (the field has unit variance)."""
    dit_model: str = "small"
    """'dit': named DiT shape; its dim and heads are replaced by heads x head_dim and heads unless a checkpoint is
    given (then the named shape must have the benchmark's heads and head dim)."""
    dit_layer: int = 0
    """'dit': index of the block whose self-attention inputs are captured."""
    qk_init: str = "tied"
    """'dit' without checkpoint: 'independent' (plain random init) or 'tied' (W_k = W_q)."""
    checkpoint: Path | None = None
    """'dit': VideoDiT weights (exported safetensors / torch state dict / Lightning .ckpt)."""
    seed: int = 0
    latents: str = "smooth"
    """'dit': the video fed to the model: 'smooth' (spatially correlated, video-like) or 'gaussian' (i.i.d., as
    bench_dit_step.py feeds it)."""

    def __post_init__(self) -> None:
        for name in ("grid", "tile"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, int) and v > 0 for v in values):
                raise ValueError(f"{name}={tuple(values)!r} must be three positive integers (t, h, w)")
        if not self.correlation >= 1 or not self.noise >= 0:
            raise ValueError(f"correlation={self.correlation} must be >= 1 token and noise={self.noise} >= 0")
        if self.qk_init not in ("independent", "tied"):
            raise ValueError(f"qk_init={self.qk_init!r} must be 'independent' or 'tied'")
        if self.dit_layer < 0:
            raise ValueError(f"dit_layer={self.dit_layer} must be >= 0")
        if self.latents not in LATENTS:
            raise ValueError(f"latents={self.latents!r} must be one of {LATENTS}")

    @property
    def seq_len(self) -> int:
        T, H, W = self.grid
        return T * H * W


def locality_qkv(locality: str, config: LocalityConfig, heads: int, head_dim: int,
                 device: torch.device) -> list[torch.Tensor]:
    """q, k, v [1, heads, T H W, head_dim] float32 on ``device``, in 3D-tiled token order (the same on every
    rank: everything is seeded)."""
    if locality not in LOCALITIES:
        raise ValueError(f"locality {locality!r} is not one of {LOCALITIES}")
    gen = torch.Generator(device=device).manual_seed(config.seed)
    shape = (1, heads, config.seq_len, head_dim)
    if locality == "iid":
        return [torch.randn(shape, generator=gen, device=device) for _ in range(3)]
    v = torch.randn(shape, generator=gen, device=device)
    if locality == "field":
        field = smooth_field(config.grid, heads * head_dim, config.correlation, gen, device)
        field = field.view(heads, head_dim, -1).transpose(1, 2)[None]  # [1, heads, L, D], raster order
        q, k = (field + config.noise * torch.randn(shape, generator=gen, device=device) for _ in range(2))
        tiling = TokenTiling.build(config.grid, config.tile, device)
        return [tiling.tile(q, dim=2), tiling.tile(k, dim=2), v]
    q, k = dit_qk(config, heads, head_dim, device)
    return [q, k, v]


def smooth_field(grid: tuple[int, int, int], channels: int, correlation: float, gen: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """[channels, T, H, W]: unit-variance Gaussian field, white noise on a grid ``correlation`` times coarser
    (at least 2 points per axis) upsampled trilinearly."""
    coarse = [max(round(n / correlation), 2) for n in grid]
    noise = torch.randn(1, channels, *coarse, generator=gen, device=device)
    field = F.interpolate(noise, size=grid, mode="trilinear", align_corners=True)[0]
    return (field - field.mean((1, 2, 3), keepdim=True)) / field.std((1, 2, 3), keepdim=True).clamp_min(1e-6)


class _Captured(Exception):
    """Stops the DiT's forward once the layer of interest has been seen."""


def dit_qk(config: LocalityConfig, heads: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(q, k) [1, heads, L, head_dim] entering ``config.dit_layer``'s self-attention of a VideoDiT with 3D tiling."""
    layers = config.dit_layer + 1
    if config.checkpoint is None:
        dit = dit_config(config.dit_model, dim=heads * head_dim, num_heads=heads, num_layers=layers,
                         tile_size=config.tile)
    else:
        dit = dit_config(config.dit_model, num_layers=layers, tile_size=config.tile)
        if (dit.num_heads, dit.head_dim) != (heads, head_dim):
            raise ValueError(f"model {config.dit_model!r} has {dit.num_heads} heads of dim {dit.head_dim}; run the "
                             f"benchmark with --heads {dit.num_heads} --head-dim {dit.head_dim}")
    torch.manual_seed(config.seed)
    model = VideoDiT(dit)
    if config.checkpoint is not None:
        from sla_dist.lightning.checkpoint import load_weights  # imports Lightning (seconds): only when needed

        # the first ``layers`` blocks; an SLA checkpoint's proj_l (attention output side) is not needed for q / k
        state = {n: t for n, t in load_weights(config.checkpoint).items() if ".core." not in n
                 and (not n.startswith("blocks.") or int(n.split(".")[1]) < layers)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {str(config.checkpoint)!r} does not fit {config.dit_model!r}: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
    elif config.qk_init == "tied":
        tie_query_key(model)
    model = model.to(device).eval()
    T, H, W = config.grid
    (pt, ph, pw) = dit.patch_size
    size = (T * pt, H * ph, W * pw)
    if config.latents == "smooth":
        latents = smooth_latents(dit.in_channels, size, config.seed)
    else:
        latents = torch.randn(1, dit.in_channels, *size, generator=torch.Generator().manual_seed(config.seed))
    latents = latents.to(device)
    text = torch.randn(1, 16, dit.text_dim, generator=torch.Generator().manual_seed(config.seed)).to(device)
    captured = []

    def hook(_module, args, _out=None):
        captured.extend(a.detach().float() for a in args[:2])
        raise _Captured

    core = model.blocks[config.dit_layer].self_attn.core
    if not isinstance(core, DenseAttention):
        raise ValueError(f"block {config.dit_layer}'s attention core is {type(core).__name__}, expected dense")
    handle = core.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(latents, torch.tensor([500.0], device=device), text)
    except _Captured:
        pass
    finally:
        handle.remove()
    return tuple(captured)


def add_locality_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`LocalityConfig` (read back by :func:`locality_config`)."""
    defaults = LocalityConfig()
    triple = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    parser.add_argument("--grid", type=triple, default=defaults.grid, help="token grid T,H,W (default 32,64,64)")
    parser.add_argument("--tile", type=triple, default=defaults.tile,
                        help="3D tile of the token order (1,1,1: raster order)")
    parser.add_argument("--correlation", type=float, default=defaults.correlation, help="'field': tokens")
    parser.add_argument("--noise", type=float, default=defaults.noise, help="'field': per-token noise std")
    parser.add_argument("--dit-model", default=defaults.dit_model, help="'dit': named DiT shape")
    parser.add_argument("--dit-layer", type=int, default=defaults.dit_layer)
    parser.add_argument("--qk-init", choices=("independent", "tied"), default=defaults.qk_init)
    parser.add_argument("--latents", choices=LATENTS, default=defaults.latents, help="'dit': the video fed in")
    parser.add_argument("--dit-checkpoint", type=Path, default=None, help="'dit': VideoDiT weights")


def locality_config(args: argparse.Namespace) -> LocalityConfig:
    """The LocalityConfig of options added by :func:`add_locality_arguments`."""
    return LocalityConfig(args.grid, args.tile, args.correlation, args.noise, args.dit_model, args.dit_layer,
                          args.qk_init, args.dit_checkpoint, latents=args.latents)
