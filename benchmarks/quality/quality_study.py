"""SLA quality study at small scale: does SLA keep the quality of dense attention after fine-tuning?

Reproduces the paper's central claim (arXiv 2509.24006) on the built-in synthetic text-to-video set:

1. pretrain the ``small`` DiT with dense attention;
2. fine-tune copies for the same number of steps with (a) dense attention, twice with different seeds (data order
   and noise: the noise floor), (b) SLA at 95% sparsity, (c) sparse-only at 95% (``linear_scope='none'``: no linear
   branch), (d) linear-only (pure normalised linear attention, the feature map of SLA's linear branch, with a
   learnable output projection starting at identity);
3. report each fine-tune's validation flow-matching loss (held-out samples, fixed noise levels) over the fine-tune
   and FVD of sampled videos against held-out videos, with the seeded random 3D-conv extractor and, given
   ``--i3d``, the I3D detector (needs >= 10 frames).

Expected ordering (paper): SLA ~ dense > sparse-only > linear-only.

The loop is deliberately plain (one process, AdamW, bf16 autocast on GPU) and uses DiTModule's objective
(``DiTModule.losses``) without a Trainer, so every variant sees identical batches and noise for one seed.

    python benchmarks/quality/quality_study.py                                  # GPU, ~10 min on one H100
    python benchmarks/quality/quality_study.py --preset cpu --cpu               # 2 CPU cores, ~1 hour
    python benchmarks/quality/quality_study.py --preset tiny --cpu --out /tmp/q # smoke test, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from sla_dist import SLAConfig
from sla_dist.eval.flow_loss import validation_loss
from sla_dist.eval.fvd import I3D_MIN_FRAMES, I3DFeatures, RandomVideoFeatures, VideoFVD
from sla_dist.eval.sampling import SamplerConfig, sample
from sla_dist.kernels.reference import feature_map_ref
from sla_dist.lightning.module import DiTModule
from sla_dist.lightning.recipe import OptimSection
from sla_dist.lightning.synthetic import SyntheticVideoDataset
from sla_dist.models import PatchConfig, VideoDiT, apply_sla, dit_config


@dataclass
class StudyConfig:
    """Sizes and schedule of the study."""

    model: str = "small"
    model_overrides: dict[str, int] = field(default_factory=dict)
    """DiTConfig fields changed from the named config (e.g. a narrower model for CPU runs)."""
    frames: int = 8
    size: int = 32
    text_len: int = 16
    train_samples: int = 1024
    val_samples: int = 64
    fvd_videos: int = 64
    reference_videos: int = 256
    batch_size: int = 8
    pretrain_steps: int = 2000
    finetune_steps: int = 500
    pretrain_lr: float = 3e-4
    finetune_lr: float = 1e-4
    eval_every: int = 100
    sample_steps: int = 25
    sparsity: float = 0.95
    dense_seeds: list[int] = field(default_factory=lambda: [0, 1])

    def __post_init__(self) -> None:
        for name in ("frames", "size", "train_samples", "val_samples", "batch_size", "pretrain_steps",
                     "finetune_steps", "eval_every", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.fvd_videos < 2 or self.reference_videos < 2:
            raise ValueError(f"fvd_videos={self.fvd_videos} and reference_videos={self.reference_videos} must be "
                             ">= 2")
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity} must lie in (0, 1)")


PRESETS = {
    "gpu": StudyConfig(),
    # 2 CPU cores in about an hour: a 4-layer, 128-wide DiT on 1024-token clips (16 key blocks of 64, so 95% asks
    # for one critical block per query block: 93.75% realised sparsity).
    "cpu": StudyConfig(model_overrides=dict(dim=128, num_heads=2, num_layers=4, ffn_dim=512, text_dim=128),
                       frames=4, size=32, train_samples=1024, val_samples=32, fvd_videos=32, reference_videos=128,
                       batch_size=4, pretrain_steps=1500, finetune_steps=300, eval_every=50, sample_steps=10),
    "tiny": StudyConfig(model="tiny", frames=4, size=16, train_samples=64, val_samples=4, fvd_videos=4,
                        reference_videos=8, batch_size=2, pretrain_steps=3, finetune_steps=2, eval_every=1,
                        sample_steps=2),
}


class LinearOnlyAttention(nn.Module):
    """phi(q) (phi(K)^T V) / (phi(q) . sum phi(K)) over all keys, then a learnable D x D projection (identity at
    start): the linear-only baseline, no softmax attention at all. O(L D^2), q, k, v [B, H, L, D]."""

    def __init__(self, head_dim: int, feature_map: str = "softmax") -> None:
        super().__init__()
        self.feature_map = feature_map
        self.proj = nn.Linear(head_dim, head_dim)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pq, pk = feature_map_ref(q.float(), self.feature_map), feature_map_ref(k.float(), self.feature_map)
        out = (pq @ (pk.transpose(-1, -2) @ v.float())) / (pq @ pk.sum(-2, keepdim=True).transpose(-1, -2))
        return self.proj(out.to(q.dtype))


def convert(model: VideoDiT, variant: str, sparsity: float) -> VideoDiT:
    """The variant's attention in every block: 'dense', 'sla', 'sparse_only' or 'linear_only'."""
    topk = 1.0 - sparsity
    if variant == "sla":
        apply_sla(model, PatchConfig(sla=SLAConfig(topk=topk, negligible=0.0)))
    elif variant == "sparse_only":
        apply_sla(model, PatchConfig(sla=SLAConfig(topk=topk, negligible=0.0, linear_scope="none")))
    elif variant == "linear_only":
        param = next(model.parameters())
        for block in model.blocks:
            block.self_attn.core = LinearOnlyAttention(model.config.head_dim).to(param)
    elif variant != "dense":
        raise ValueError(f"unknown variant {variant!r}")
    return model


class Data:
    """Pre-rendered synthetic train / validation / reference sets (disjoint index ranges of one generator)."""

    def __init__(self, config: StudyConfig, channels: int, text_dim: int, device: torch.device) -> None:
        c = config
        total = c.train_samples + max(c.val_samples, c.fvd_videos) + c.reference_videos
        self.dataset = SyntheticVideoDataset(total, channels, c.frames, c.size, c.size, text_dim, c.text_len)

        def stack(indices):
            items = [self.dataset[i] for i in indices]
            return (torch.stack([it["latents"] for it in items]).to(device),
                    torch.stack([it["text"] for it in items]).to(device))

        held = c.train_samples + max(c.val_samples, c.fvd_videos)
        self.train = stack(range(c.train_samples))
        self.held_out = stack(range(c.train_samples, held))
        self.reference = self.dataset.codec.decode(stack(range(held, total))[0].cpu())

    def batch(self, step: int, seed: int, batch_size: int) -> dict:
        generator = torch.Generator().manual_seed(zlib.crc32(f"data,{seed},{step}".encode()))
        idx = torch.randint(self.train[0].shape[0], (batch_size,), generator=generator).to(self.train[0].device)
        return {"latents": self.train[0][idx], "text": self.train[1][idx], "index": idx}


def train(module: DiTModule, data: Data, steps: int, lr: float, seed: int, config: StudyConfig,
          evaluate=None) -> list[tuple[int, float]]:
    """``steps`` AdamW steps of DiTModule's flow-matching loss; ``evaluate(step)`` every ``eval_every`` steps."""
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = params[0].device
    curve = [(0, evaluate())] if evaluate else []
    module.seed = seed
    for step in range(steps):
        batch = data.batch(step, seed, config.batch_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = module.losses(batch, module.step_generator(step))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if evaluate and ((step + 1) % config.eval_every == 0 or step + 1 == steps):
            curve.append((step + 1, evaluate()))
    return curve


def measure(model: VideoDiT, data: Data, config: StudyConfig, extractors: dict[str, VideoFVD]) -> dict:
    model.eval()
    latents, text = data.held_out
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=latents.device.type == "cuda"):
        val = validation_loss(model, latents[:config.val_samples], text[:config.val_samples])
        generated = sample(model, text[:config.fvd_videos], tuple(latents.shape[1:]),
                           SamplerConfig(steps=config.sample_steps))
    videos = data.dataset.codec.decode(generated.cpu())
    model.train()
    return {"val_loss": val, **{f"fvd_{name}": fvd(videos) for name, fvd in extractors.items()}}


def run(config: StudyConfig, device: torch.device, i3d: str | None, out: Path) -> dict:
    dit = dit_config(config.model, **config.model_overrides)
    data = Data(config, dit.in_channels, dit.text_dim, device)
    extractors = {"random": VideoFVD(RandomVideoFeatures().to(device), data.reference)}
    if i3d is not None:
        if config.frames < I3D_MIN_FRAMES:
            raise ValueError(f"--i3d needs >= {I3D_MIN_FRAMES} frames; this study renders {config.frames}")
        extractors["i3d"] = VideoFVD(I3DFeatures(i3d).to(device), data.reference)
    t0 = time.time()
    base = DiTModule(dit, OptimSection(lr=config.pretrain_lr), seed=0).to(device)
    pretrain_curve = train(base, data, config.pretrain_steps, config.pretrain_lr, 0, config)
    pretrained = copy.deepcopy(base.model.state_dict())
    results = {"config": asdict(config), "model": asdict(dit), "device": str(device), "torch": torch.__version__,
               "pretrain_seconds": time.time() - t0,
               "pretrain_final_loss": None if not pretrain_curve else pretrain_curve[-1][1], "variants": {}}
    runs = [(f"dense_seed{s}", "dense", s) for s in config.dense_seeds]
    runs += [("sla", "sla", 0), ("sparse_only", "sparse_only", 0), ("linear_only", "linear_only", 0)]
    for name, variant, seed in runs:
        t0 = time.time()
        module = DiTModule(dit, OptimSection(lr=config.finetune_lr), seed=seed, init_state=pretrained)
        convert(module.model, variant, config.sparsity)
        module = module.to(device)
        curve = train(module, data, config.finetune_steps, config.finetune_lr, seed, config,
                      evaluate=lambda: validation_loss(module.model, data.held_out[0][:config.val_samples],
                                                       data.held_out[1][:config.val_samples]))
        results["variants"][name] = {"variant": variant, "seed": seed, "val_curve": curve,
                                     **measure(module.model, data, config, extractors),
                                     "seconds": time.time() - t0}
        print(f"{name}: {json.dumps({k: v for k, v in results['variants'][name].items() if k != 'val_curve'})}",
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "quality.png")
    table = markdown_table(results)
    (out / "quality.md").write_text(table)
    print(table)
    return results


def markdown_table(results: dict) -> str:
    fvds = [k for k in next(iter(results["variants"].values())) if k.startswith("fvd_")]
    lines = ["| variant | val flow loss (start -> end) | " + " | ".join(f"FVD ({k[4:]})" for k in fvds) + " |",
             "| --- | --- |" + " --- |" * len(fvds)]
    for name, r in results["variants"].items():
        start, end = r["val_curve"][0][1], r["val_curve"][-1][1]
        lines.append(f"| {name} | {start:.4f} -> {end:.4f} | " + " | ".join(f"{r[k]:.3f}" for k in fvds) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, r in results["variants"].items():
        steps, losses = zip(*r["val_curve"])
        curves.plot(steps, losses, marker=".", label=name)
    curves.set_xlabel("fine-tune step")
    curves.set_ylabel("validation flow-matching loss")
    curves.legend(fontsize="small")
    curves.grid(alpha=0.3)
    names = list(results["variants"])
    bars.bar(names, [results["variants"][n]["fvd_random"] for n in names])
    bars.set_ylabel("FVD (random 3D-conv features)")
    bars.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu",
                        help="sizes and schedule: gpu (default), cpu (about an hour on 2 cores), tiny (smoke test)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (SLA uses its PyTorch reference)")
    parser.add_argument("--i3d", help="I3D TorchScript detector for the standard FVD")
    parser.add_argument("--out", default="benchmarks/results/quality", help="output directory")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--finetune-steps", type=int)
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    overrides = {k: v for k, v in (("pretrain_steps", args.pretrain_steps),
                                   ("finetune_steps", args.finetune_steps)) if v is not None}
    config = StudyConfig(**{**asdict(config), **overrides})
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu (with --preset cpu or tiny) to run on CPU")
    device = torch.device("cpu" if args.cpu else "cuda")
    run(config, device, args.i3d, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
