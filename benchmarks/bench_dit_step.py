"""DiT step time with dense attention vs SLA: inference forward and training step, diffusers Wan and the reference.

For each model (diffusers ``WanTransformer3DModel`` and sla_dist's ``VideoDiT``, same Wan2.1-1.3B shape, random
init, bf16) and each self-attention variant:

    dense   stock attention, SDPA with --dense-backend first in priority (cuDNN by default)
    sla     apply_sla() at --topk (0.05 = 95 % of key blocks skipped)
    none    self-attention replaced by "return v" (projections, RoPE and everything else kept): the time of the
            non-attention part, whose model-FLOPs utilisation (MFU) says how efficient that part is

it times a no-grad forward and a training step (forward + backward, per-block activation checkpointing unless
--no-checkpoint; no optimizer) at 21 x 60 x 104 latents = 32760 tokens, and reports MFU from analytic model FLOPs
(matmuls only, backward = 2 x forward, recomputation not counted; SLA's attention counted at its realised critical
fraction). --compile compiles each block (torch.compile, default mode) for every variant alike.

    python benchmarks/bench_dit_step.py                 # GPU, the 1.3B shape; table last, JSON + markdown written
    python benchmarks/bench_dit_step.py --tiny          # CPU smoke test of every code path

--profile N adds, per variant, the device time per kernel category (SLA kernels, GEMMs, elementwise, ...) and the N
kernels with the most device time over two more training steps (CPU ops on a CPU): where the step's time goes, e.g.
how much more the SLA layers cost inside the model than alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from results_io import save_results
from step_profile import classify
from sla_dist import SLAConfig, SparseLinearAttention
from sla_dist.kernels.block_map import block_counts, num_blocks
from sla_dist.models import VideoDiT, apply_sla
from sla_dist.models.layers import MLP
from sla_dist.models.config import DiTConfig


@dataclass(frozen=True)
class Shape:
    dim: int
    heads: int
    layers: int
    ffn: int
    text_dim: int
    channels: int
    freq_dim: int
    latents: tuple[int, int, int]
    text_len: int

    @property
    def tokens(self) -> int:
        T, H, W = self.latents
        return T * (H // 2) * (W // 2)


SHAPES = {
    "wan2.1-1.3b": Shape(1536, 12, 30, 8960, 4096, 16, 256, (21, 60, 104), 512),
    "tiny": Shape(64, 2, 2, 128, 32, 4, 32, (4, 16, 16), 8),
}
DENSE_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION}
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAKS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


class ValueOnly(nn.Module):
    """Attention stand-in that returns v: keeps every other op of the block, costs no attention FLOPs."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v


def build_reference(shape: Shape, checkpoint: bool) -> nn.Module:
    config = DiTConfig(dim=shape.dim, num_heads=shape.heads, num_layers=shape.layers, ffn_dim=shape.ffn,
                       text_dim=shape.text_dim, in_channels=shape.channels, out_channels=shape.channels,
                       freq_dim=shape.freq_dim, checkpoint_blocks=checkpoint)
    return VideoDiT(config)


def build_wan(shape: Shape, checkpoint: bool) -> nn.Module:
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging

    # cast_model() below keeps the float32 modules as from_pretrained(torch_dtype=...) would; silence the warning
    # diffusers gives for the plain .to(dtype) that precedes it.
    logging.set_verbosity_error()
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=shape.heads, attention_head_dim=shape.dim // shape.heads,
        in_channels=shape.channels, out_channels=shape.channels, text_dim=shape.text_dim, freq_dim=shape.freq_dim,
        ffn_dim=shape.ffn, num_layers=shape.layers)
    if checkpoint:
        model.enable_gradient_checkpointing()
    return model


BUILDERS = {"wan": build_wan, "reference": build_reference}


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to ``dtype`` except the modules a diffusers model lists in ``_keep_in_fp32_modules`` (Wan: RoPE
    tables, time embedder, norms, modulation tables), which stay float32 as in a stock bf16 Wan pipeline."""
    model = model.to(dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and any(part in keep for part in name.split(".")):
            tensor.data = tensor.data.float()
    return model


def set_variant(model: nn.Module, variant: str, sla: SLAConfig) -> None:
    if variant == "dense":
        return
    apply_sla(model, sla)
    if variant == "none":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, SparseLinearAttention):
                    setattr(parent, name, ValueOnly())


def model_flops(shape: Shape, attention_fraction: float, sla_linear: bool) -> float:
    """Forward matmul FLOPs: projections, MLP, cross-attention, embeddings, and self-attention's QK^T and PV
    scaled by ``attention_fraction`` (1 dense, SLA's critical fraction, 0 for 'none')."""
    n, lt, d, f = shape.tokens, shape.text_len, shape.dim, shape.ffn
    patch = shape.channels * 4
    per_layer = (8 * n * d * d                       # self-attention qkv + out
                 + 4 * n * n * d * attention_fraction  # QK^T + PV
                 + 4 * n * d * d + 4 * lt * d * d      # cross-attention q + out, k + v
                 + 4 * n * lt * d                      # cross-attention QK^T + PV
                 + 4 * n * d * f)                      # MLP
    if sla_linear:
        per_layer += 4 * n * d * (d // shape.heads)   # linear branch: phi(K)^T V and phi(Q) H per head
    embed = 4 * n * patch * d + 2 * lt * (shape.text_dim * d + d * d)
    return shape.layers * per_layer + embed


def inputs_for(model_name: str, shape: Shape, device, dtype):
    latents = torch.randn(1, shape.channels, *shape.latents, device=device, dtype=dtype)
    text = torch.randn(1, shape.text_len, shape.text_dim, device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)
    if model_name == "wan":
        return lambda model: model(latents, timestep, text).sample
    return lambda model: model(latents, timestep, text)


def time_ms(fn, warmup: int, iters: int, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def critical_fraction(shape: Shape, sla: SLAConfig) -> float:
    nk = num_blocks(shape.tokens, sla.block_k)
    return block_counts(nk, sla.topk, sla.negligible)[0] / nk


def run_one(model_name: str, variant: str, shape: Shape, args, device, dtype) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = BUILDERS[model_name](shape, args.checkpoint)
    model = cast_model(model, dtype)
    set_variant(model, variant, args.sla)
    for module in model.modules():  # the reference DiT's MLPs: fused GELU backward (default on CUDA) or module calls
        if isinstance(module, MLP):
            module.fused = None if args.mlp == "fused" else False
    if args.compile:
        for block in model.blocks:
            block.compile()
    run = inputs_for(model_name, shape, device, dtype)

    def forward():
        with torch.no_grad():
            run(model)

    def train_step():
        model.zero_grad(set_to_none=True)
        run(model).float().square().mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    fwd = time_ms(forward, args.warmup, args.iters, device)
    model.train()
    step = time_ms(train_step, args.warmup, args.iters, device)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    profiled = profile_steps(train_step, args.profile, device) if args.profile else None
    fraction = {"dense": 1.0, "sla": critical_fraction(shape, args.sla), "none": 0.0}[variant]
    flops = model_flops(shape, fraction, variant == "sla" and args.sla.linear_scope != "none")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = dict(model=model_name, variant=variant, forward_ms=fwd, train_step_ms=step, peak_memory_gib=memory,
                  forward_tflop=flops / 1e12, attention_fraction=fraction)
    if profiled is not None:
        result["profile"] = profiled
    if args.peak:
        result["forward_mfu"] = flops / (fwd * 1e-3) / args.peak
        result["train_mfu"] = 3 * flops / (step * 1e-3) / args.peak
    print(f"{model_name:9s} {variant:5s} forward {fwd:9.1f} ms  train step {step:9.1f} ms", flush=True)
    return result


PROFILED_STEPS = 2


def profile_steps(train_step, rows: int, device) -> dict:
    """Time per category (step_profile.classify: SLA kernels, GEMMs, other attention, elementwise, ...) and the
    ``rows`` kernels (CPU ops without a GPU) with the most time over PROFILED_STEPS training steps, per step,
    printed and returned."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            train_step()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    if cuda:  # kernels only: the CPU-side ops that launched them carry no device time of their own
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    per_step = lambda us: us / 1e3 / PROFILED_STEPS  # noqa: E731
    categories: dict[str, float] = {}
    for e in events:
        kind = classify(e.key, "kernel" if cuda else "cpu_op")
        categories[kind] = categories.get(kind, 0.0) + per_step(own(e))
    top = [dict(name=e.key[:100], ms=per_step(own(e)), calls=e.count / PROFILED_STEPS)
           for e in sorted(events, key=own, reverse=True)[:rows]]
    print(f"  {'kernels' if cuda else 'CPU ops'} per step: {sum(categories.values()):.1f} ms in all; by category: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(categories.items(), key=lambda kv: -kv[1]))
          + f"; the {rows} largest:")
    for row in top:
        print(f"  {row['ms']:9.2f} ms {row['calls']:7.1f} x  {row['name']}")
    return dict(categories_ms=categories, top=top)


def peak_flops(device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def table(results: list[dict]) -> str:
    dense = {(r["model"]): r for r in results if r["variant"] == "dense"}
    lines = ["| model | attention | forward ms | train step ms | fwd speed-up | step speed-up | fwd MFU | step MFU "
             "| peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for r in results:
        base = dense.get(r["model"])
        up = (lambda key: f"{base[key] / r[key]:.2f}x") if base else (lambda key: "-")  # noqa: E731
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['forward_ms']:.1f} | {r['train_step_ms']:.1f} | "
                     f"{up('forward_ms')} | {up('train_step_ms')} | {pct(r.get('forward_mfu'))} | "
                     f"{pct(r.get('train_mfu'))} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shape in float32 (CPU smoke test)")
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), default=["wan", "reference"])
    parser.add_argument("--variants", nargs="+", choices=("dense", "sla", "none"), default=["dense", "sla", "none"])
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--negligible", type=float, default=0.10)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--feature-map", default="softmax")
    parser.add_argument("--linear-scope", default="marginal")
    parser.add_argument("--dkdv-split", choices=("env", "long", "off"), default="long",
                        help="SLAConfig.dkdv_split of the SLA layers: 'long' (the Wan recipes' setting) splits the "
                        "dK/dV kernel's long query-block lists (a DiT's skewed block maps), 'off' keeps whole lists, "
                        "'env' as SLA_DIST_DKDV_SPLIT says")
    parser.add_argument("--dense-backend", choices=("cudnn", "flash", "efficient", "auto"), default="cudnn")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--layers", type=int, default=None, help="blocks of the model (default: the shape's, 30 at the "
                        "1.3B shape): a few blocks time a per-layer change in its model context in less device time")
    parser.add_argument("--mlp", choices=("fused", "modules"), default="fused",
                        help="the reference DiT's MLP: its GELU backward fused (the default on CUDA) or the Linear / "
                        "GELU module calls (before 2026-12-02)")
    parser.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                        help="train without per-block activation checkpointing (the 1.3B shape fits an H200 without)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also list the N kernels with the most device time per training step")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (auto on "
                        "H100 / H200 / A100)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (default: "
                        "benchmarks/results/<date>-dit-step-<card>)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shape = SHAPES["tiny" if args.tiny else "wan2.1-1.3b"]
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit(f"--layers {args.layers}: at least 1")
        shape = replace(shape, layers=args.layers)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
    args.sla = SLAConfig(topk=args.topk, negligible=args.negligible, block_q=args.block_q, block_k=args.block_k,
                         feature_map=args.feature_map, linear_scope=args.linear_scope, dkdv_split=args.dkdv_split)
    args.peak = peak_flops(device, args.peak_tflops)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # The chosen backend first; the others only where it cannot take a call, so a run never stops on "no kernel".
    restrict = contextlib.nullcontext()
    if device.type == "cuda" and args.dense_backend != "auto":
        first = DENSE_BACKENDS[args.dense_backend]
        restrict = sdpa_kernel([first] + [b for b in DENSE_BACKENDS.values() if b != first], set_priority=True)
    print(f"{card}: {shape.tokens} tokens, {shape.layers} layers, dim {shape.dim}, {dtype}, SLA topk {args.topk} "
          f"(critical fraction {critical_fraction(shape, args.sla):.3f})", flush=True)

    results = []
    with restrict:
        for model_name in args.models:
            for variant in args.variants:
                results.append(run_one(model_name, variant, shape, args, device, dtype))

    meta = dict(shape=asdict(shape), tokens=shape.tokens, dtype=str(dtype), sla=asdict(args.sla),
                dense_backend=args.dense_backend, compile=args.compile, checkpoint=args.checkpoint, mlp=args.mlp,
                warmup=args.warmup, iters=args.iters,
                peak_flops=args.peak)
    text = table(results)
    save_results("dit-step", card, meta, results, "DiT step: dense vs SLA",
                 f"{shape.tokens} tokens, {shape.layers} layers, dim {shape.dim}, {dtype}; SLA {asdict(args.sla)}; "
                 f"dense SDPA backend {args.dense_backend}; training step = forward + backward "
                 f"{'with' if args.checkpoint else 'without'} per-block checkpointing; reference MLP {args.mlp}"
                 f"{', blocks compiled' if args.compile else ''}; median of {args.iters}. MFU: analytic matmul "
                 f"FLOPs (training = 3 x forward) over peak {args.peak}.", text, out=args.out, tiny=args.tiny)
    print(text)


if __name__ == "__main__":
    main()
