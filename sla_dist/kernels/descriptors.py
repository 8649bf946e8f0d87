"""Host side of the kernels' tensor-descriptor (TMA) path: which launches take it, and the scratch memory it needs.

SLA_DIST_TMA (configs.tma_kernels) names the kernels whose loop tiles are loaded through tensor descriptors, built in
the kernel over one (batch, head)'s [L, D] rows (tiles.row_descriptor). A descriptor needs its base address 16-byte
aligned and its row stride a multiple of 16 bytes; the launcher gives a head's base as the tensor's address plus
b * stride_b + h * stride_h, so those strides must be multiples of 16 bytes too. Any tensor of a launch that breaks
one of these (a view at an odd offset, rows an odd number of elements apart) sends that launch down the pointer path:
:func:`use_tma` decides on the host, per launch, and the kernel gets the answer as its USE_TMA constexpr. So do
float32 inputs: their products run on FMA units (PRECISION ieee) from tiles held in registers, and a descriptor only
adds a shared-memory copy of each tile (sm_90, Triton 3.6, D 128, fixed launch settings: dK/dV 225 -> 353 KiB, past
the 227 KiB a block may take), where the tensor-core dtypes' tiles go to shared memory anyway.

A descriptor made inside a kernel is written to global scratch memory, which Triton requests at launch from the
allocator given to ``triton.set_allocator``. Triton (3.6 and 3.9 alike) keeps that allocator in a ContextVar, so one
set in the main thread is not seen by another thread, such as the device thread on which autograd runs a CUDA
backward: :func:`use_tma` sets ours in every context that has none yet, and keeps one the caller set.
"""

from __future__ import annotations

import torch

from .configs import Switches, read_switches, tma_kernels

DESCRIPTOR_ALIGN = 16
"""Bytes: the alignment of a descriptor's base address and of its strides but the last."""
DESCRIPTOR_DTYPES = (torch.float16, torch.bfloat16)
"""The inputs whose tiles go through descriptors: those whose products run on tensor cores."""


def descriptor_ready(x: torch.Tensor) -> bool:
    """True when every (batch, head) of x [B, H, L, D] (unit last stride) is read through a descriptor over its
    [L, D] rows: x has a DESCRIPTOR_DTYPES dtype, and its address and its strides over l, and over b and h where they
    move the base (size > 1), are multiples of DESCRIPTOR_ALIGN bytes."""
    if x.dtype not in DESCRIPTOR_DTYPES or x.data_ptr() % DESCRIPTOR_ALIGN:
        return False
    B, H = x.shape[:2]
    stride_b, stride_h, stride_l, _ = x.stride()
    size = x.element_size()
    return (stride_l * size % DESCRIPTOR_ALIGN == 0 and (B == 1 or stride_b * size % DESCRIPTOR_ALIGN == 0)
            and (H == 1 or stride_h * size % DESCRIPTOR_ALIGN == 0))


def use_tma(kernel: str, *tensors: torch.Tensor, switches: Switches | None = None) -> bool:
    """The USE_TMA constexpr of one launch of ``kernel`` (configs.TMA_KERNELS) whose loop reads ``tensors``: on when
    configs.tma_kernels names the kernel for the tensors' device (SLA_DIST_TMA, or its default; ``switches``: as
    read for this launch) and a descriptor can address every one of them, else the pointer path. Decided per launch,
    never cached: the addresses change between calls. On a GPU, makes sure the launch finds an allocator for the
    descriptors' scratch memory."""
    switches = switches or read_switches()
    if kernel not in tma_kernels(tensors[0].device, switches):
        return False
    for x in tensors:
        if not descriptor_ready(x):
            return False
    if not switches.interpreting:  # the interpreter keeps descriptors on the host
        _ensure_allocator()
    return True


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's allocator protocol: ``size`` bytes of device memory for one launch (256 per program for these
    kernels' two descriptors), on the current device. The caching allocator's blocks are 512-byte aligned (Triton
    asks for 128), and the tensor is released once the launch is queued, which is safe on its stream as for any
    PyTorch temporary."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
