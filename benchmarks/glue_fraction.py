"""How much of the SLA layer's CUDA time runs outside its sparse-branch kernels (issue #11: "everything outside the
sparse-branch kernels (block map, linear summaries and sums, proj_l, casts) <= 15 % of the layer's time").

The sparse-branch kernels are the forward (``_sla_fwd_kernel``, which also runs the linear branch's epilogue), dQ
(``_bwd_dq_kernel``) and dK/dV (``_bwd_dkdv_kernel``). The backward pre-pass (``_bwd_prepass_kernel``) computes the
sparse branch's delta = rowsum(dO * O) AND the linear branch's gradients, so it is reported both ways: counted as
glue (strict) and as a sparse-branch kernel (lenient). Everything else, memsets and copies included, is glue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

SPARSE_KERNELS = ("_sla_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
PREPASS_KERNEL = "_bwd_prepass_kernel"
GLUE_TARGET = 0.15


def is_kernel(name: str, kernel: str) -> bool:
    """Whether ``name``, as the profiler lists it (Triton may append a suffix), is the Triton kernel ``kernel``."""
    return name == kernel or name.startswith(kernel + "_")


def is_sparse_kernel(name: str, prepass_counts: bool) -> bool:
    """Whether kernel ``name`` (as the profiler lists it) is a sparse-branch kernel."""
    names = SPARSE_KERNELS + ((PREPASS_KERNEL,) if prepass_counts else ())
    return any(is_kernel(name, k) for k in names)


def glue_fraction(kernel_us: Mapping[str, float], prepass_counts: bool) -> float:
    """Fraction of the total CUDA time in ``kernel_us`` (kernel name -> time) outside the sparse-branch kernels."""
    if any(t < 0 for t in kernel_us.values()):
        raise ValueError(f"negative kernel time in {dict(kernel_us)}")
    total = sum(kernel_us.values())
    if total <= 0:
        raise ValueError(f"no CUDA time in the kernel list {dict(kernel_us)}: nothing was profiled")
    sparse = sum(t for name, t in kernel_us.items() if is_sparse_kernel(name, prepass_counts))
    return 1.0 - sparse / total


def glue_summary(kernel_us: Mapping[str, float]) -> dict:
    """{'total_us', 'glue_strict', 'glue_lenient'}: the fraction with the pre-pass as glue, and as sparse branch."""
    return dict(total_us=sum(kernel_us.values()), glue_strict=glue_fraction(kernel_us, prepass_counts=False),
                glue_lenient=glue_fraction(kernel_us, prepass_counts=True))


def kernel_times(events, calls: int) -> dict[str, float]:
    """Kernel name -> CUDA µs per call from a profiler's ``key_averages()``: the device-side entries, without the
    device-side ranges of ``record_function`` annotations (they span kernels already counted)."""
    out: dict[str, float] = {}
    for e in events:
        annotation = getattr(e, "is_user_annotation", False)
        if str(e.device_type).endswith("CUDA") and e.device_time_total > 0 and not annotation:
            out[e.key] = out.get(e.key, 0.0) + e.device_time_total / calls
    return out


def profile_kernels(step: Callable[[], object], calls: int = 3) -> dict[str, float]:
    """Kernel name -> CUDA µs per call of ``step`` (already warmed up), ``calls`` calls under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return kernel_times(prof.key_averages(), calls)


def glue_lines(label: str, kernel_us: Mapping[str, float]) -> str:
    """One line per reading, for profile_sla.py's output."""
    s = glue_summary(kernel_us)
    return (f"glue outside the sparse-branch kernels, {label}: {100 * s['glue_strict']:.1f} % of "
            f"{s['total_us'] / 1e3:.3f} ms CUDA time with the pre-pass as glue, {100 * s['glue_lenient']:.1f} % "
            f"with it as sparse branch (target <= {100 * GLUE_TARGET:.0f} %)")
