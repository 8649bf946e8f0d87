"""Where a pretrained study model's attention sits, and how much SLA's linear branch could ever recover of it.

For every self-attention layer of a quality-study checkpoint (``quality_study.py --phase pretrain`` writes one), on
held-out clips, per topk:

* ``kept mass``: the share of each query's softmax mass inside the key blocks SLA's block map keeps (predicted from
  pooled q and k, as training uses it), and ``oracle mass``: inside the same number of key blocks chosen by their
  true mass (the best any block map of that size could keep);
* ``sparse error``: the sparse branch alone (sparse-only, and SLA before fine-tuning, when proj_l is zero) against
  full attention, relative L2;
* ``best SLA error``: O_s + O_l W + b against full attention with the least-squares W, b over all of the layer's
  rows (proj_l is shared by the heads): no training of proj_l can go below it on these q, k, v. When it stays close to
  the sparse error, the linear branch's features cannot carry what the dropped blocks held, whatever proj_l learns;
  when it is much lower, proj_l's training (learning rate, steps, distillation) is what falls short.

Runs on CPU in float32 with the PyTorch reference, one head at a time (a few minutes for the gpu preset's 9216-token
clips):

    python benchmarks/quality/attention_mass.py --resume-from .quality-ft --topk 0.05 0.1 0.2 --clips 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sla_dist.calibration import ProjectionFit  # noqa: E402
from sla_dist.config import SLAConfig  # noqa: E402
from sla_dist.kernels.block_map import CRITICAL, block_counts, predict_block_map  # noqa: E402
from sla_dist.kernels.reference import sla_branches_ref  # noqa: E402
from sla_dist.lightning.synthetic import SCENES  # noqa: E402
from study_attention import visit_attention  # noqa: E402
from study_train import load_study_model, sla_config, study_clips  # noqa: E402


class LayerStats:
    """Sums over one layer's heads and clips, per topk: kept / oracle mass, squared errors, and the normal
    equations of the least-squares projection [O_l, 1] -> O - O_s."""

    def __init__(self, topks: list[float], head_dim: int) -> None:
        self.rows = 0
        self.kept = dict.fromkeys(topks, 0.0)
        self.oracle = dict.fromkeys(topks, 0.0)
        self.fits = {t: ProjectionFit.empty(head_dim, torch.device("cpu")) for t in topks}

    def add(self, topk: float, kept: torch.Tensor, oracle: torch.Tensor, o_s: torch.Tensor, o_l: torch.Tensor,
            reference: torch.Tensor) -> None:
        self.kept[topk] += float(kept.sum())
        self.oracle[topk] += float(oracle.sum())
        self.fits[topk].add(o_s, o_l, reference)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for t, fit in self.fits.items():
            _, _, best_error = fit.solve(ridge=1e-9)  # a tiny ridge keeps the solve finite
            out[str(t)] = {"kept_mass": self.kept[t] / self.rows, "oracle_mass": self.oracle[t] / self.rows,
                           "sparse_error": fit.sparse_error,
                           "best_sla_error": best_error}
        return out


def head_stats(stats: LayerStats, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sla: SLAConfig) -> None:
    """Add one head ([1, 1, L, D] each, float32) to ``stats``; ``sla`` gives the block sizes and feature map."""
    length, block_q = q.shape[2], sla.block_q
    probs = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)[0, 0]
    reference = (probs @ v[0, 0])[None, None]
    n_blocks, q_blocks = -(-length // sla.block_k), -(-length // block_q)
    padded = F.pad(probs, (0, n_blocks * sla.block_k - length))
    block_mass = padded.view(length, n_blocks, sla.block_k).sum(-1)  # [L, Nk]: each query's mass per key block
    # per query block: [Nq, block_q, Nk], padded rows carry no mass
    per_q_block = F.pad(block_mass, (0, 0, 0, q_blocks * block_q - length)).view(q_blocks, block_q, n_blocks)
    stats.rows += length
    for topk in stats.kept:
        bm = predict_block_map(q, k, topk=topk, negligible=0.0, block_q=block_q, block_k=sla.block_k, kernels=False)
        critical = bm.block_class[0, 0] == CRITICAL  # [Nq, Nk]
        kept = (per_q_block * critical[:, None, :]).sum(-1)
        # the oracle keeps, per query block, the n_c key blocks with the most mass over that block's queries
        n_c, _ = block_counts(n_blocks, topk, 0.0)
        best = per_q_block.sum(1).topk(n_c, dim=-1).indices
        oracle = per_q_block.gather(2, best[:, None, :].expand(-1, block_q, -1)).sum(-1)
        o_s, o_l, _ = sla_branches_ref(q, k, v, bm, feature_map=sla.feature_map, linear_scope="marginal")
        stats.add(topk, kept, oracle, o_s, o_l, reference)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume-from", type=Path, required=True, help="a quality-study checkpoint folder")
    parser.add_argument("--scene", choices=SCENES, help="the synthetic scene of the clips: the checkpoint's (the "
                        "default); another one is refused")
    parser.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--clips", type=int, default=1, help="held-out clips (noise levels spread over (0, 1))")
    parser.add_argument("--json", type=Path, help="write the per-layer results here")
    args = parser.parse_args(argv)
    checkpoint, config, dit, model = load_study_model(args.resume_from, scene=args.scene)
    sla = sla_config("sla", config)
    latents, text = study_clips(config, dit, range(config.train_samples, config.train_samples + args.clips))
    layers: list[LayerStats] = []

    def visit(layer, core, q, k, v, out):
        stats = LayerStats(args.topk, q.shape[-1])
        for n in range(q.shape[0]):
            for h in range(q.shape[1]):
                head_stats(stats, *(t[n:n + 1, h:h + 1].float() for t in (q, k, v)), sla)
        layers.append(stats)
        print(f"layer {layer}: " + "  ".join(f"topk {t}: kept {r['kept_mass']:.3f} oracle {r['oracle_mass']:.3f} "
                                             f"sparse err {r['sparse_error']:.3f} best SLA err "
                                             f"{r['best_sla_error']:.3f}" for t, r in stats.summary().items()),
              flush=True)

    visit_attention(model, latents, text, visit)
    results = {"checkpoint": str(args.resume_from), "scene": config.scene,
               "pretrain_steps": checkpoint.meta["pretrain"]["steps"], "clips": args.clips, "block_q": sla.block_q,
               "block_k": sla.block_k, "layers": [s.summary() for s in layers]}
    print(f"\n{config.scene} scene, {results['pretrain_steps']} pretrain steps, {args.clips} held-out clip(s)")
    print("\n| layer | " + " | ".join(f"topk {t}: kept / oracle mass, sparse / best-SLA error" for t in args.topk) + " |")
    print("|---|" + "---|" * len(args.topk))
    for i, layer in enumerate(results["layers"]):
        print(f"| {i} | " + " | ".join(f"{r['kept_mass']:.3f} / {r['oracle_mass']:.3f}, {r['sparse_error']:.3f} / "
                                      f"{r['best_sla_error']:.3f}" for r in layer.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
