"""What SLA's linear branch O_l holds in a pretrained study model, and how much of it a proj_l can use.

For every self-attention layer of a quality-study checkpoint, on held-out clips (q, k, v from the dense model's own
forward, float32 PyTorch reference, one head at a time), at one topk:

* ``|O_l| / |O_s|``: size of the linear branch against the sparse one, and ``spread``: the share of O_l that varies
  over a head's queries, ||O_l - mean_rows O_l|| / ||O_l||. The rest is one vector per head and clip: through
  proj_l and the attention's output projection a constant, close to what that projection's own bias gives the
  sparse-only model too;
* ``bf16 noise / spread``: ||bf16(O_l) - O_l|| / ||O_l - mean_rows O_l||, the rounding of the kernels' bfloat16 O_l
  (the H200 runs) against the part of O_l that carries information;
* ``rank``: effective rank (participation ratio) of the covariance of O_l's rows (pooled over the layer's heads);
* errors against full attention, relative L2 over the layer's rows: ``sparse`` (proj_l = 0, sparse-only), ``bias``
  (the best constant b, W = 0), ``best`` (least-squares W, b: attention_mass.py's best-SLA error), ``best bf16``
  (the same fit on bf16-rounded O_l), and the best error with ||W||_F at most ``reach`` (a ridge path): what a W
  that AdamW can reach in a fine-tune of the study's length can do;
* ``|W*|``: ||W||_F of the unconstrained least-squares W.

AdamW moves every weight by at most about lr per step, so from zero ||W||_F <= lr * steps * D after ``steps``
steps: 0.04 * 64 = 2.56 at the study's lr 1e-4 and 400 steps, 25.6 with ``--proj-lr-scale 10``.

    python benchmarks/quality/linear_branch.py --resume-from .quality-tex --topk 0.05 --clips 1 --reach 2.56 25.6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sla_dist.calibration import ProjectionFit  # noqa: E402
from sla_dist.config import SLAConfig  # noqa: E402
from sla_dist.kernels.block_map import predict_block_map  # noqa: E402
from sla_dist.kernels.reference import linear_branch_ref, sla_branches_ref  # noqa: E402
from sla_dist.lightning.synthetic import SCENES  # noqa: E402
from study_attention import visit_attention  # noqa: E402
from study_train import load_study_model, sla_config, study_clips  # noqa: E402

RIDGES = tuple(10.0 ** e for e in range(-9, 3))
"""Relative ridges of the path from the least-squares W (smallest) towards W = 0."""


class BranchStats:
    """One layer's sums over heads and clips: branch sizes, O_l's spread and rounding, and two projection fits."""

    def __init__(self, head_dim: int, keep_rows: bool = False) -> None:
        self.head_dim = head_dim
        self.sums = dict.fromkeys(("o_s", "o_l", "spread", "bf16_noise"), 0.0)
        self.fit_bf16 = ProjectionFit.empty(head_dim, torch.device("cpu"))
        self.rows: list[tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], int]] | None = [] if keep_rows else None
        self.by_clip: dict[int, ProjectionFit] = {}

    def add_head(self, o_s: torch.Tensor, o_l: torch.Tensor, reference: torch.Tensor, clip: int) -> None:
        """o_s, o_l, reference: one head's [L, D] (float32) of held-out clip ``clip``."""
        rounded = o_l.bfloat16().float()
        for key, value in (("o_s", o_s), ("o_l", o_l), ("spread", o_l - o_l.mean(0)), ("bf16_noise", rounded - o_l)):
            self.sums[key] += float(value.double().square().sum())
        self.fit_bf16.add(o_s, rounded, reference)
        self.by_clip.setdefault(clip, ProjectionFit.empty(self.head_dim, torch.device("cpu"))).add(o_s, o_l, reference)
        if self.rows is not None:
            self.rows.append(((o_s, o_l, reference), clip))

    def effective_rank(self) -> float:
        """Participation ratio (sum lambda)^2 / sum lambda^2 of the covariance of O_l's rows."""
        fit = self.fit
        D, n = self.head_dim, fit.rows
        mean = fit.gram[:D, D] / n
        cov = fit.gram[:D, :D] / n - torch.outer(mean, mean)
        eig = torch.linalg.eigvalsh(cov).clamp_min(0)
        return float(eig.sum() ** 2 / eig.square().sum())

    def bias_error(self) -> float:
        """Error of the best constant b with W = 0: b = mean row of O - O_s."""
        fit, D = self.fit, self.head_dim
        return fit.error(torch.zeros(D, D, dtype=torch.float64), fit.cross[D] / fit.rows)

    def reachable_error(self, reach: float) -> float:
        """The lowest error over the ridge path with ||W||_F <= reach (the bias error when no W on it is small
        enough)."""
        best, fit = self.bias_error(), self.fit
        for ridge in RIDGES:
            weight, _, error = fit.solve(ridge)
            if float(weight.norm()) <= reach:
                best = min(best, error)
        return best

    @property
    def fit(self) -> ProjectionFit:
        """The fit over every clip's rows."""
        return self._pooled(sorted(self.by_clip))

    def _pooled(self, clips: list[int]) -> ProjectionFit:
        pooled = ProjectionFit.empty(self.head_dim, torch.device("cpu"))
        for c in clips:
            pooled.merge(self.by_clip[c])
        return pooled

    def split(self) -> tuple[list[int], list[int]]:
        """(fitted, held-out) clips: even and odd ones, so that both spread over the noise levels; with one clip,
        that clip and none."""
        clips = sorted(self.by_clip)
        return clips[::2], clips[1::2]

    def transfer_errors(self) -> dict[str, float]:
        """With two or more clips: the fit of the even clips (least squares, and the best ridge of the path) applied
        to the odd ones, against their own sparse error."""
        fitted, held = (self._pooled(c) for c in self.split())
        if not held.rows:
            return {}
        path = [held.error(*fitted.solve(ridge)[:2]) for ridge in RIDGES]
        return {"held_out_sparse_error": held.sparse_error, "held_out_error_of_fit": path[0],
                "held_out_error_best_ridge": min(path)}

    def adam_errors(self, lr: float, steps: int) -> dict[str, float]:
        """``steps`` full-batch Adam steps of lr ``lr`` on the least-squares objective of the fitted clips' rows,
        from W = 0, b = 0 as conversion leaves proj_l (how far the fine-tune's optimizer gets on it with nothing
        else moving and no gradient noise): the error on those rows, ||W||_F and, with held-out clips, the error
        there."""
        fit_clips, held_clips = self.split()
        o_s, o_l, reference = (torch.cat(t) for t in zip(*(r for r, c in self.rows if c in fit_clips)))
        residual = reference - o_s
        D = o_l.shape[-1]
        weight = torch.zeros(D, D, requires_grad=True)
        bias = torch.zeros(D, requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=lr)
        scale = self._pooled(fit_clips).reference_sq
        with torch.enable_grad():  # the layer visits run under no_grad
            for _ in range(steps):
                loss = (F.linear(o_l, weight, bias) - residual).square().sum() / scale
                opt.zero_grad()
                loss.backward()
                opt.step()
        solution = weight.detach().double(), bias.detach().double()
        tag = f"adam_{lr:g}x{steps}"
        out = {f"error_{tag}": self._pooled(fit_clips).error(*solution),
               f"weight_norm_{tag}": float(weight.detach().norm())}
        if held_clips:
            out[f"held_out_error_{tag}"] = self._pooled(held_clips).error(*solution)
        return out

    def summary(self, reach: list[float], adam: list[tuple[float, int]] = ()) -> dict[str, float]:
        s = self.sums
        fit = self.fit
        weight, _, best = fit.solve(1e-9)  # a tiny ridge keeps the solve finite
        ratio = lambda a, b: (s[a] / max(s[b], 1e-300)) ** 0.5  # noqa: E731
        return {"o_l_over_o_s": ratio("o_l", "o_s"), "spread": ratio("spread", "o_l"),
                "bf16_noise_over_spread": ratio("bf16_noise", "spread"),
                "effective_rank": self.effective_rank(), "sparse_error": fit.sparse_error,
                "bias_error": self.bias_error(), "best_error": best, "best_error_bf16": self.fit_bf16.solve(1e-9)[2],
                "best_weight_norm": float(weight.norm()),
                **{f"error_reach_{r:g}": self.reachable_error(r) for r in reach}, **self.transfer_errors(),
                **{k: v for lr, steps in adam for k, v in self.adam_errors(lr, steps).items()}}


@dataclasses.dataclass(frozen=True)
class LinearVariant:
    """Screens of changes to the linear branch that the kernels do not have (yet): measured here first."""

    phi_scale: float = 1.0
    """phi's input is phi_scale * q and phi_scale * k (a temperature: > 1 sharpens the softmax feature map)."""
    center: bool = False
    """O_l minus its mean over the head's queries, so proj_l sees only the query-dependent part."""


def head_branches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sla: SLAConfig, topk: float,
                  variant: LinearVariant = LinearVariant()):
    """(O_s, O_l, full attention) of one head, [1, 1, L, D] float32 each -> [L, D] each."""
    bm = predict_block_map(q, k, topk=topk, negligible=0.0, block_q=sla.block_q, block_k=sla.block_k, kernels=False)
    o_s, o_l, _ = sla_branches_ref(q, k, v, bm, feature_map=sla.feature_map, linear_scope="marginal")
    if variant.phi_scale != 1.0:  # only the linear branch sees the scaled q, k
        s = variant.phi_scale
        o_l = linear_branch_ref(q * s, k * s, v, bm, sla.feature_map, "marginal")
    o_l = o_l[0, 0]
    if variant.center:
        o_l = o_l - o_l.mean(dim=0, keepdim=True)
    return o_s[0, 0], o_l, F.scaled_dot_product_attention(q, k, v)[0, 0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume-from", type=Path, required=True, help="a quality-study checkpoint folder")
    parser.add_argument("--scene", choices=SCENES, help="the checkpoint's scene (the default); another is refused")
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--clips", type=int, default=1, help="held-out clips (noise levels spread over (0, 1))")
    parser.add_argument("--reach", type=float, nargs="*", default=[2.56, 25.6],
                        help="bounds on ||W||_F for the reachable-error columns")
    parser.add_argument("--feature-map", choices=("softmax", "elu", "relu"),
                        help="phi of the linear branch (default: the checkpoint's study config's)")
    parser.add_argument("--adam-lr", type=float, nargs="*", default=[],
                        help="train proj_l alone on each layer's rows with full-batch Adam at these lrs")
    parser.add_argument("--layers", type=int, nargs="*", help="only these layers (default: all)")
    parser.add_argument("--adam-steps", type=int, default=400)
    parser.add_argument("--phi-scale", type=float, default=1.0,
                        help="screen: phi of (this x q, this x k) in the linear branch (a feature-map temperature)")
    parser.add_argument("--center", action="store_true",
                        help="screen: O_l centred over each head's queries before the projection fits")
    parser.add_argument("--json", type=Path, help="write the per-layer results here")
    args = parser.parse_args(argv)
    if not args.phi_scale > 0:
        parser.error(f"--phi-scale must be a positive number, got {args.phi_scale}")
    variant = LinearVariant(args.phi_scale, args.center)
    checkpoint, config, dit, model = load_study_model(args.resume_from, scene=args.scene)
    if args.feature_map is not None:
        config = dataclasses.replace(config, feature_map=args.feature_map)
    sla = sla_config("sla", config)
    adam = [(lr, args.adam_steps) for lr in args.adam_lr]
    latents, text = study_clips(config, dit, range(config.train_samples, config.train_samples + args.clips))
    layers: list[dict] = []

    def visit(layer, core, q, k, v, out):
        if args.layers and layer not in args.layers:
            return
        stats = BranchStats(q.shape[-1], keep_rows=bool(adam))
        for n in range(q.shape[0]):
            for h in range(q.shape[1]):
                stats.add_head(*head_branches(*(t[n:n + 1, h:h + 1].float() for t in (q, k, v)), sla, args.topk,
                                              variant), clip=n)
        layers.append({"layer": layer, **stats.summary(args.reach, adam)})
        print(", ".join(f"{k} {v:.4g}" for k, v in layers[-1].items()), flush=True)

    visit_attention(model, latents, text, visit)
    results = {"checkpoint": str(args.resume_from), "scene": config.scene, "topk": args.topk,
               "feature_map": config.feature_map, "variant": dataclasses.asdict(variant),
               "pretrain_steps": checkpoint.meta["pretrain"]["steps"], "clips": args.clips, "layers": layers}
    keys = list(layers[0])[1:]
    print("\n| layer | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for layer in layers:
        print(f"| {layer['layer']} | " + " | ".join(f"{layer[k]:.4g}" for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
