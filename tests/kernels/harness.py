"""Run the SLA kernels and the float64 / same-dtype references on the same inputs and compare their errors.

The rule (the project's testing standard): the kernel's error against float64 must be within 2x (outputs) and 3x
(gradients) of the error the reference itself makes when computed in the kernel's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sla_dist.kernels import backward_ops, configs, op, summary_rows
from sla_dist.kernels.block_map import BlockMap, predict_block_map
from sla_dist.kernels.op import sparse_linear_attention
from sla_dist.kernels.reference import sla_reference

NAMES = ("out", "dq", "dk", "dv", "dproj_w", "dproj_b")
OUTPUT_FACTOR, GRAD_FACTOR = 2.0, 3.0


@dataclass
class SLACase:
    B: int
    H: int
    L: int
    D: int
    dtype: torch.dtype
    topk: float
    negligible: float
    feature_map: str
    linear_scope: str
    block_q: int = 64
    block_k: int = 64
    device: torch.device = torch.device("cpu")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def make_inputs(c: SLACase, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh random q, k, v, upstream gradient and a nonzero proj_l (a zero one would hide the linear branch)."""

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(c.device, c.dtype)

    shape = (c.B, c.H, c.L, c.D)
    return dict(q=randn(*shape), k=randn(*shape), v=randn(*shape), w=randn(c.D, c.D, scale=c.D**-0.5),
                b=randn(c.D, scale=0.1), grad=randn(*shape))


def case_block_map(c: SLACase, inputs: dict[str, torch.Tensor]) -> BlockMap:
    """The block map the layer would predict for the case's q and k (its topk, negligible and block sizes)."""
    return predict_block_map(inputs["q"], inputs["k"], topk=c.topk, negligible=c.negligible, block_q=c.block_q,
                             block_k=c.block_k)


def _run(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    leaves = [inputs[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v", "w", "b")]
    out = fn(*leaves)
    out.backward(inputs["grad"].to(dtype))
    return [out.detach()] + [x.grad for x in leaves]


def run_layer(c: SLACase, inputs: dict[str, torch.Tensor], block_map: BlockMap, *, reference: bool = False,
              dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Output and gradients (NAMES) of the layer with the kernels, or the reference, in ``dtype`` (c.dtype)."""
    opts = dict(feature_map=c.feature_map, linear_scope=c.linear_scope)
    attention = sla_reference if reference else sparse_linear_attention
    return _run(lambda q, k, v, w, b: attention(q, k, v, block_map, w, b, **opts), inputs, dtype or c.dtype)


def compare(c: SLACase, inputs: dict[str, torch.Tensor], block_map: BlockMap | None = None,
            got: list[torch.Tensor] | None = None) -> dict[str, tuple]:
    """{name: (kernel error, same-dtype reference error)} against the float64 reference, both relative, on
    ``block_map`` (default: predicted from the inputs); ``got``: the kernels' results if already run."""
    if block_map is None:
        block_map = case_block_map(c, inputs)
    got = run_layer(c, inputs, block_map) if got is None else got
    exact = run_layer(c, inputs, block_map, reference=True, dtype=torch.float64)
    low = run_layer(c, inputs, block_map, reference=True)
    return _errors(got, low, exact)


def compare_query_blocks(c: SLACase, inputs: dict[str, torch.Tensor], blocks: list[int]) -> dict[str, tuple]:
    """Like :func:`compare`, for sequences too long for a dense reference: the upstream gradient is kept on the rows
    of a few query blocks only; the kernel runs on the whole sequence, the references on those rows (the last
    listed block may be the partial last one)."""
    block_map = case_block_map(c, inputs)
    nq = block_map.block_class.shape[2]
    blocks = sorted(b % nq for b in blocks)
    rows = torch.cat([torch.arange(b * c.block_q, min((b + 1) * c.block_q, c.L)) for b in blocks]).to(c.device)
    sub_map = replace(block_map, block_class=block_map.block_class[:, :, blocks],
                      kv_num_blocks=block_map.kv_num_blocks[:, :, blocks],
                      kv_indices=block_map.kv_indices[:, :, blocks], q_len=len(rows))
    grad = torch.zeros_like(inputs["grad"])
    grad[:, :, rows] = inputs["grad"][:, :, rows]
    opts = dict(feature_map=c.feature_map, linear_scope=c.linear_scope)

    def kernel(q, k, v, w, b):
        return sparse_linear_attention(q, k, v, block_map, w, b, **opts)[:, :, rows]

    def reference(q, k, v, w, b):
        return sla_reference(q[:, :, rows], k, v, sub_map, w, b, **opts)

    def run(fn, dtype):
        leaves = [inputs[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v", "w", "b")]
        out = fn(*leaves)
        out.backward(grad[:, :, rows].to(dtype))
        dq = leaves[0].grad[:, :, rows]
        return [out.detach(), dq] + [x.grad for x in leaves[1:]]

    return _errors(run(kernel, c.dtype), run(reference, c.dtype), run(reference, torch.float64))


def _errors(got: list, low: list, exact: list) -> dict[str, tuple]:
    errors = {}
    for name, g, lo, e in zip(NAMES, got, low, exact):
        if e is None:  # proj_l takes no gradient when the linear branch is off
            assert g is None, f"{name} has a gradient although the reference has none"
            continue
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        errors[name] = (relative_error(g, e), relative_error(lo, e))
    return errors


def within_rule(name: str, kernel_err: float, ref_err: float) -> bool:
    """The kernel's error within OUTPUT_FACTOR (the output) / GRAD_FACTOR (gradients) of the reference's."""
    return kernel_err <= (OUTPUT_FACTOR if name == "out" else GRAD_FACTOR) * ref_err


def assert_within_reference_error(errors: dict[str, tuple]) -> None:
    report = ", ".join(f"{n}: {k:.2e} vs {r:.2e}" for n, (k, r) in errors.items())
    for name, (kernel_err, ref_err) in errors.items():
        factor = OUTPUT_FACTOR if name == "out" else GRAD_FACTOR
        assert within_rule(name, kernel_err, ref_err), (
            f"{name} error {kernel_err:.3e} > {factor} x {ref_err:.3e} ({report})")


LAUNCHER_MODULES = (op, backward_ops, summary_rows)
"""The modules that launch the layer's kernels through configs.get_kernel (forward, backward, linear sums)."""


def patch_launchers(monkeypatch, get_kernel) -> None:
    """``get_kernel`` in place of configs.get_kernel wherever the layer launches its kernels."""
    for module in LAUNCHER_MODULES:
        monkeypatch.setattr(module, "get_kernel", get_kernel)


class KernelArgs:
    """Stands in for configs.get_kernel (see :func:`patch_launchers`): launches the real kernels and records (kernel name, argument) for every launch of
    a kernel that has the parameter ``param``, given by position or by name."""

    def __init__(self, param: str) -> None:
        self.param, self.seen = param, []

    def __call__(self, name: str):
        kernel, params = configs.get_kernel(name), configs.jit_function(name).arg_names
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if recorder.param in kwargs:
                        recorder.seen.append((name, kwargs[recorder.param]))
                    elif recorder.param in params:
                        recorder.seen.append((name, args[params.index(recorder.param)]))
                    return kernel[grid](*args, **kwargs)
                return launch

        return Launcher()


class MatrixProducts(TorchDispatchMode):
    """Records the output shape of every PyTorch matrix product (mm, bmm, addmm) run while it is active, eager or
    inside a compiled graph."""

    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.PRODUCTS:
            self.shapes.append(tuple(out.shape))
        return out


def layer_step(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients (q, k, v, proj_l weight) of one forward+backward of an SLA layer on fresh leaves, copied
    at once: a CUDA-graph replay reuses the memory of the previous one's outputs and gradients."""
    layer.zero_grad(set_to_none=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = layer(*leaves)
    out.backward(grad)
    return [out.detach().clone()] + [t.grad.clone() for t in leaves] + [layer.proj_l.weight.grad.clone()]
