"""proj_l calibration: fit each SLA layer's linear-branch projection to full attention by least squares.

A converted layer starts with proj_l = 0, i.e. as block-sparse attention, and fine-tuning has to find what the linear
branch should add. On a pretrained model the best proj_l for the layer's own inputs is a least-squares problem: with
O the full softmax attention over all keys (what the dense model computed), O_s the sparse branch and O_l the linear
branch of the same q, k, v,

    minimise  || O_s + O_l W^T + b - O ||^2   over W [D, D], b [D]

over every row of every head (proj_l is shared by a layer's heads). ``calibrate_projections`` runs calibration
forwards of the model with a hook on every SparseLinearAttention layer, accumulates each layer's normal equations
in float64 (a [D + 1, D + 1] Gram matrix of [O_l, 1] and its [D + 1, D] product with O - O_s; nothing per token is
kept), and sets proj_l to the ridge-regularised solution. It needs the dense reference once per layer and forward:
O(L^2) attention, as the pretrained model's own forward.

Why: on the quality study's pretrained model (9216 tokens, 95 % sparsity) the least-squares proj_l lowers each
layer's attention error against full attention (mean 0.59 -> 0.47), where 400 fine-tune steps from zero left SLA
level with sparse-only attention. Measured on an H200 it is no better start there: the converted model's validation
loss doubles (one pass or sequential) and the fine-tune from it ends behind sparse-only
(benchmarks/results/2026-11-30-quality-conversion-h200.md). A tool to measure what a linear branch can add to a
model, not a default.

With several processes (data parallel, Ulysses sequence parallel: each rank's layers see its own samples or heads),
pass the ``group`` every rank of which holds the same proj_l: the normal equations are summed over it before the
solve, so every rank sets the same proj_l, the fit over all of their rows. Not for ZeRO-3 (proj_l partitioned) or
context parallel (its ranks never run a layer's forward on a whole sequence).

``ProjectionCalibration`` holds the two phases apart (hooks around forwards the caller makes, then the solve):
``SLACallback(calibrate=True)`` collects during a training step's own forward (sparsity.calibrate in a recipe). A
layer run twice on the same inputs (activation checkpointing's recompute) adds its rows twice: the same fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from .attention import SparseLinearAttention, dense_attention


@dataclass
class ProjectionFit:
    """One layer's least-squares problem, accumulated over calibration forwards (float64)."""

    gram: torch.Tensor
    """[D + 1, D + 1]: sum over rows of x x^T, x = [O_l, 1]."""
    cross: torch.Tensor
    """[D + 1, D]: sum over rows of x (O - O_s)^T."""
    residual_sq: float = 0.0
    """sum ||O - O_s||^2: the sparse branch's squared error."""
    reference_sq: float = 0.0
    """sum ||O||^2."""
    rows: int = 0

    @classmethod
    def empty(cls, head_dim: int, device: torch.device) -> "ProjectionFit":
        return cls(torch.zeros(head_dim + 1, head_dim + 1, dtype=torch.float64, device=device),
                   torch.zeros(head_dim + 1, head_dim, dtype=torch.float64, device=device))

    def add(self, o_s: torch.Tensor, o_l: torch.Tensor, reference: torch.Tensor) -> None:
        residual = (reference.double() - o_s.double()).flatten(0, -2)
        x = torch.cat([o_l.double().flatten(0, -2), residual.new_ones(residual.shape[0], 1)], dim=1)
        self.gram += x.T @ x
        self.cross += x.T @ residual
        self.residual_sq += float(residual.square().sum())
        self.reference_sq += float(reference.double().square().sum())
        self.rows += residual.shape[0]

    def merge(self, other: "ProjectionFit") -> None:
        """Add ``other``'s statistics (the rows of other forwards) to these: the fit over both sets of rows."""
        self.gram += other.gram
        self.cross += other.cross
        self.residual_sq += other.residual_sq
        self.reference_sq += other.reference_sq
        self.rows += other.rows

    def all_reduce(self, group: dist.ProcessGroup) -> None:
        """Sum the statistics over ``group`` (one collective)."""
        n = self.gram.shape[0]
        flat = torch.cat([self.gram.flatten(), self.cross.flatten(), self.gram.new_tensor(
            [self.residual_sq, self.reference_sq, float(self.rows)])])
        dist.all_reduce(flat, group=group)
        self.gram.copy_(flat[:n * n].view(n, n))
        self.cross.copy_(flat[n * n:-3].view(n, n - 1))
        self.residual_sq, self.reference_sq, rows = flat[-3:].tolist()
        self.rows = round(rows)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(W [D, D], b [D], the relative error ||O_s + O_l W^T + b - O|| / ||O|| the solution reaches on the
        calibration rows). ``ridge`` is relative to the Gram matrix's mean diagonal."""
        n = self.gram.shape[0]
        scale = float(self.gram.diagonal().mean()) or 1.0
        solution = torch.linalg.solve(self.gram + ridge * scale * torch.eye(n, dtype=self.gram.dtype,
                                                                            device=self.gram.device), self.cross)
        weight, bias = solution[:-1].T, solution[-1]
        return weight, bias, self.error(weight, bias)

    def error(self, weight: torch.Tensor, bias: torch.Tensor) -> float:
        """||O_s + O_l W^T + b - O|| / ||O|| over the accumulated rows, for any W [D, D] and b [D]."""
        solution = torch.cat([weight.T, bias[None]]).detach().to(self.gram)
        # ||R - X S||^2 = ||R||^2 - 2 <S, X^T R> + <S, X^T X S>
        fitted_sq = (self.residual_sq - 2 * float((solution * self.cross).sum())
                     + float((solution * (self.gram @ solution)).sum()))
        return self._relative(fitted_sq)

    @property
    def sparse_error(self) -> float:
        """||O_s - O|| / ||O|| over the accumulated rows: the layer with proj_l = 0."""
        return self._relative(self.residual_sq)

    def _relative(self, squared_error: float) -> float:
        return (max(squared_error, 0.0) / max(self.reference_sq, 1e-300)) ** 0.5


class ProjectionCalibration:
    """The two phases of a calibration, for callers that own the forwards (e.g. a training step's own forward):

        with ProjectionCalibration(model) as calibration:  # hooks on every SLA layer with a linear branch
            model(x, t, text)                              # any number of forwards
        report = calibration.apply(ridge=1e-6, group=...)  # all-reduce, solve, set proj_l

    Entering registers the hooks, leaving removes them (also on an exception); ``apply`` is ``calibrate_projections``'
    solve phase and returns its report. ``set_weight(param, value)``: how a solution is written into proj_l's weight
    and bias (default: a copy into the parameter), for optimizers that keep a master copy of their own."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        self.layers = calibrated_layers(model)
        if names is not None:  # a subset, e.g. one layer of a sequential calibration
            names = list(names)
            unknown = sorted(set(names) - set(self.layers))
            if unknown:
                raise ValueError(f"names {unknown} are not SLA layers with a linear branch in the model; "
                                 f"those are {sorted(self.layers)}")
            self.layers = {name: self.layers[name] for name in names}
        self.fits: dict[str, ProjectionFit] = {}
        self._handles: list = []

    def _hook(self, name: str, layer: SparseLinearAttention, args: tuple, _output: Any) -> None:
        with torch.no_grad():
            q, k, v = args[:3]
            o_s, o_l, _, _ = layer.branches(q, k, v)
            reference = dense_attention(q, k, v)
            if name not in self.fits:
                self.fits[name] = ProjectionFit.empty(layer.head_dim, q.device)
            self.fits[name].add(o_s, o_l, reference)

    def __enter__(self) -> "ProjectionCalibration":
        self._handles = [layer.register_forward_hook(lambda m, a, o, n=name: self._hook(n, m, a, o))
                         for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def apply(self, ridge: float = 1e-6, group: dist.ProcessGroup | None = None,
              set_weight: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> dict[str, dict]:
        """Sum the fits over ``group`` (every rank must call this), solve and set each layer's proj_l; the report
        of ``calibrate_projections``. Raises ValueError for a negative ``ridge`` or when no forward reached any
        layer (on any rank)."""
        if not ridge >= 0:
            raise ValueError(f"ridge={ridge!r} must be a non-negative number")
        set_weight = set_weight or (lambda param, value: param.copy_(value.to(param)))
        fits = self.fits
        if group is not None:
            for name, layer in self.layers.items():  # the same order on every rank; a layer this rank missed adds 0
                if name not in fits:
                    fits[name] = ProjectionFit.empty(layer.head_dim, layer.proj_l.weight.device)
                fits[name].all_reduce(group)
            fits = {name: fit for name, fit in fits.items() if fit.rows}
        if self.layers and not fits:
            raise ValueError(f"the calibration run called none of the model's {len(self.layers)} SLA layers")
        report = {}
        for name, fit in fits.items():
            weight, bias, error = fit.solve(ridge)
            proj = self.layers[name].proj_l
            set_weight(proj.weight, weight)
            set_weight(proj.bias, bias)
            report[name] = {"rows": fit.rows,
                            "sparse_error": fit.sparse_error,
                            "calibrated_error": error}
        self.fits = {}
        return report


def calibrated_layers(model: nn.Module) -> dict[str, SparseLinearAttention]:
    """The SparseLinearAttention modules of ``model`` (or ``model`` itself) with a linear branch, by name, in module
    order: those calibration fits."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, SparseLinearAttention) and m.config.linear_scope != "none"}


def calibrate_projections(model: nn.Module, run: Callable[[], Any], *, ridge: float = 1e-6,
                          group: dist.ProcessGroup | None = None, sequential: bool = False) -> dict[str, dict]:
    """Set every SparseLinearAttention's proj_l in ``model`` (or ``model`` itself) to the least-squares fit to full
    attention over the forwards that ``run()`` makes (e.g. ``lambda: model(x, t, text)`` over a few batches).

    Layers without a linear branch (``linear_scope='none'``) are left as they are. Returns, per calibrated layer
    (by module name), ``rows``, ``sparse_error`` (the sparse branch alone against full attention, relative L2 over
    the calibration rows: the layer with proj_l = 0) and ``calibrated_error`` (with the fitted proj_l, on the same
    rows). ``group``: sum the fits over these processes first (module docstring); every rank must call this.

    ``sequential=False`` fits every layer in one pass of ``run()``, each on the inputs that the layers before it
    produce with their proj_l as it was; once those change, a layer's inputs are no longer the ones it was fitted
    on. ``sequential=True`` fits the layers one at a time in module order, each on the inputs of the already fitted
    layers before it (one ``run()`` per layer), so every reported error is the layer's error in the final model on
    the calibration inputs. Raises ValueError for a negative ``ridge`` or when ``run`` reached none of the layers
    (on any rank)."""
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge!r} must be a non-negative number")
    steps = [[name] for name in calibrated_layers(model)] if sequential else [None]
    report = {}
    for names in steps:
        with ProjectionCalibration(model, names) as calibration, torch.no_grad():
            run()
        report.update(calibration.apply(ridge, group))
    return report
