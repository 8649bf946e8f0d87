"""apply_compile(): torch.compile each block of a VideoDiT in place (torchtitan's per-block compile).

Compiling block by block rather than the whole model keeps the compile time of a deep DiT to that of one block (the
blocks share a structure, so Dynamo reuses their graph) and fuses what lies around the attention inside each block:
the adaLN modulation, the norms, RoPE, the gates and residual adds. ``nn.Module.compile`` compiles the block in place,
so parameter names and state_dict keys stay as they were (no ``_orig_mod.`` level): checkpoints and exports of a
compiled model are those of the eager one, and a run may turn compilation on or off when it resumes.
"""

from __future__ import annotations

from typing import Callable

from .dit import VideoDiT

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
"""The torch.compile modes training accepts."""

_REFUSED_MODES = {
    "reduce-overhead": "its CUDA graphs reuse their gradient buffers at every replay, while DeepSpeed accumulates "
                       "each step's gradients into the parameters' .grad (gradient accumulation across micro-batches)",
    "max-autotune": "it captures CUDA graphs as 'reduce-overhead' does; use 'max-autotune-no-cudagraphs'",
}


def check_compile_mode(mode: str, name: str = "compile_mode") -> None:
    """ValueError naming ``mode`` unless it is one of ``COMPILE_MODES`` (and why, for the CUDA-graph modes)."""
    if mode in _REFUSED_MODES:
        raise ValueError(f"{name}={mode!r} is not supported for training: {_REFUSED_MODES[mode]}; choose one of "
                         f"{COMPILE_MODES}")
    if mode not in COMPILE_MODES:
        raise ValueError(f"{name}={mode!r} is not one of {COMPILE_MODES}")


def apply_compile(model: VideoDiT, mode: str = "default", backend: str | Callable = "inductor") -> None:
    """Compile every block of ``model`` in place with ``torch.compile(mode=mode, backend=backend)``.

    Apply it after the model's conversions (``apply_sla``, sequence parallelism) and before a data-parallel wrapper
    (DeepSpeed), as torchtitan does; compilation itself happens at each block's first call. Activation
    checkpointing (``DiTConfig.checkpoint_blocks``) runs inside the block's forward, so the compiled graph holds
    the checkpoint and its recomputation. ``mode`` is for Inductor only: other backends (a name such as
    ``"aot_eager"``, which tests use to skip code generation, or a callable) take none. Blocks compiled before
    are left as they are. Sequence-parallel layers must use the fused Ulysses exchange (the default)."""
    check_compile_mode(mode, "mode")
    for name, module in model.named_modules():
        if getattr(getattr(module, "parallel", None), "exchange", None) == "deepspeed":
            raise NotImplementedError(
                f"{name}.parallel uses exchange='deepspeed', which torch.compile does not support: on 2 H200s (NCCL) "
                "compiled blocks with DeepSpeed's all-to-all gave gradients off by 100% of their largest value "
                "(benchmarks/diagnose_compiled_sp.py); use exchange='fused', which compiles as functional "
                "collectives")
    options = {"mode": mode} if backend == "inductor" else {}
    for block in model.blocks:
        if block._compiled_call_impl is None:
            block.compile(backend=backend, **options)
