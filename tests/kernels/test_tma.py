"""The tensor-descriptor (TMA) path of the kernels' loop tiles (SLA_DIST_TMA; configs.tma_kernels, descriptors.py,
tiles.row_descriptor). Only how the tiles are loaded changes, not what is computed from them: with SLA_DIST_TMA=all
every launch that can take descriptors does, and gives the pointer path's output and gradients (bit for bit in the
interpreter, whose descriptor loads are masked loads; within the harness's error rule against float64 everywhere),
on partial last blocks, in the DiT's layouts (q, k and dO [B, L, H, D] viewed as [B, H, L, D], v sliced from the
fused qkv projection), and with query blocks taken in row slices. A layout no descriptor can address takes the
pointer path for that launch (the interpreter checks a descriptor's alignment as the hardware does, so a launch that
took descriptors there would raise), and so do float32 inputs."""

import contextvars
import threading
from dataclasses import replace

import pytest
import torch
import triton
from triton.runtime import _allocation

from sla_dist.kernels import configs, descriptors
from sla_dist.kernels.configs import DEFAULT_TMA_KERNELS, TMA_ENV, TMA_KERNELS, tma_kernels
from sla_dist.kernels.descriptors import descriptor_ready, use_tma
from tests.utils import DEVICE, HAS_CUDA

from .harness import (NAMES, KernelArgs, SLACase, assert_within_reference_error, case_block_map, compare, make_inputs,
                      patch_launchers, run_layer, within_rule)

LAUNCHES = {"fwd", "dq", "dkdv"}  # the launches that take USE_TMA (the forward as its unsplit entry here)


def _run_both(c: SLACase, inputs: dict, monkeypatch) -> tuple[list, list, dict[str, bool]]:
    """(pointer path's results, SLA_DIST_TMA=all's, {launch: its USE_TMA}) of one forward and backward."""
    block_map = case_block_map(c, inputs)
    monkeypatch.setenv(TMA_ENV, "off")
    pointers = run_layer(c, inputs, block_map)
    monkeypatch.setenv(TMA_ENV, "all")
    launches = KernelArgs("USE_TMA")
    patch_launchers(monkeypatch, launches)
    tma = run_layer(c, inputs, block_map)
    assert len(launches.seen) == len(LAUNCHES), launches.seen
    return pointers, tma, dict(launches.seen)


def _assert_same_results(c: SLACase, inputs: dict, pointers: list, tma: list) -> None:
    """On the interpreter bit for bit. On a GPU no worse than the pointer path against the float64 reference (within
    2 %), and within the error rule wherever the pointer path is: the rule itself is the other tests' job (the split
    forward's dW misses it on the GPU with or without descriptors: test_fwd_loop.py's xfail)."""
    for name, x, y in zip(NAMES, pointers, tma):
        assert (x is None) == (y is None), name
        if x is not None and not HAS_CUDA:
            assert torch.equal(x, y), (name, (x.double() - y.double()).abs().max())
    block_map = case_block_map(c, inputs)
    errors = compare(c, inputs, block_map, got=tma)
    if HAS_CUDA:
        pointer_errors = compare(c, inputs, block_map, got=pointers)
        for name, (tma_err, _) in errors.items():
            assert tma_err <= 1.02 * pointer_errors[name][0] + 1e-7, (name, tma_err, pointer_errors[name])
        errors = {name: e for name, e in errors.items() if within_rule(name, *pointer_errors[name])}
    assert_within_reference_error(errors)


HALF = [torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float16]  # the interpreter's bf16 dots are wrong


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("L, D, linear_scope, block_q", [
    (459, 32, "marginal", 64),   # partial last blocks of 11 rows
    (131, 64, "none", 64),       # 3 rows in the last block
    (300, 32, "all", 128),       # 128-row query blocks over 64-row key blocks
])
def test_descriptors_give_the_pointer_results(dtype, L, D, linear_scope, block_q, monkeypatch, poison_outputs):
    c = SLACase(B=2, H=2, L=L, D=D, dtype=dtype, topk=0.25, negligible=0.1, feature_map="softmax",
                linear_scope=linear_scope, block_q=block_q, device=DEVICE)
    inputs = make_inputs(c, torch.Generator().manual_seed(L))
    pointers, tma, used = _run_both(c, inputs, monkeypatch)
    assert used == dict.fromkeys(LAUNCHES, True)
    _assert_same_results(c, inputs, pointers, tma)


def _dit_inputs(c: SLACase, layout: str) -> dict:
    """q, k, dO (and v) in a model's layouts. dit: q, k and dO [B, L, H, D] views, v the last third of the fused qkv
    projection [B, L, 3 H D] (every stride a multiple of 16 bytes: descriptors apply). offset: every tensor a view 1
    element into its buffer (a base address off 16 bytes). padded-rows: [B, L, H, D + 1] buffers cut to D (rows
    (D + 1) H elements apart, not a multiple of 16 bytes), dO in the same layout so that the backward keeps it."""
    g = torch.Generator().manual_seed(7)
    B, H, L, D = c.B, c.H, c.L, c.D

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, c.dtype)

    if layout == "dit":
        q, k, grad = (randn(B, L, H, D).transpose(1, 2) for _ in range(3))
        v = randn(B, L, 3 * H * D)[..., 2 * H * D:].unflatten(-1, (H, D)).transpose(1, 2)
    elif layout == "offset":
        q, k, v, grad = (randn(B * H * L * D + 1)[1:].view(B, H, L, D) for _ in range(4))
    else:
        q, k, v, grad = (randn(B, L, H, D + 1)[..., :D].transpose(1, 2) for _ in range(4))
    return dict(q=q, k=k, v=v, w=randn(D, D, scale=D**-0.5), b=randn(D, scale=0.1), grad=grad)


@pytest.mark.parametrize("layout, dtype, takes_descriptors", [
    ("dit", torch.float16, True), ("offset", torch.float16, False), ("padded-rows", torch.float16, False),
    ("dit", torch.float32, False)])
def test_layouts(layout, dtype, takes_descriptors, monkeypatch, poison_outputs):
    """The DiT's layouts take descriptors; layouts a descriptor cannot address take the pointer path, launch by
    launch, and give the same results; so do float32 inputs (descriptors.DESCRIPTOR_DTYPES)."""
    c = SLACase(B=2, H=2, L=333, D=32, dtype=dtype, topk=0.25, negligible=0.1, feature_map="softmax",
                linear_scope="marginal", device=DEVICE)
    inputs = _dit_inputs(c, layout)
    assert all(descriptor_ready(inputs[n]) == takes_descriptors for n in ("q", "k", "v", "grad"))
    pointers, tma, used = _run_both(c, inputs, monkeypatch)
    assert used == dict.fromkeys(LAUNCHES, takes_descriptors)
    _assert_same_results(c, inputs, pointers, tma)


def test_row_slices_of_query_blocks(monkeypatch, poison_outputs):
    """Query blocks taken in halves: dK/dV's Q_SPLIT = 2 row slices (descriptors of half a block's rows, the last
    slice past L) and the split forward (its own 64-row programs over the same key tiles)."""
    monkeypatch.setenv(configs.FWD_LOOP_ENV, "split+fma")
    tuning = configs._KERNELS["dkdv"]
    monkeypatch.setitem(configs._KERNELS, "dkdv", replace(tuning, choices=(("KEYS_AS_COLUMNS", (0,)),
                                                                           ("Q_SPLIT", (2,)))))
    configs.get_kernel.cache_clear()
    try:
        c = SLACase(B=1, H=2, L=290, D=32, dtype=torch.float16, topk=0.3, negligible=0.1, feature_map="relu",
                    linear_scope="marginal", block_q=128, device=DEVICE)
        inputs = make_inputs(c, torch.Generator().manual_seed(2))
        pointers, tma, used = _run_both(c, inputs, monkeypatch)
        assert used == {"fwd_split": True, "dq": True, "dkdv": True}
        _assert_same_results(c, inputs, pointers, tma)
    finally:
        configs.get_kernel.cache_clear()


def test_launch_decision(monkeypatch):
    """Per launch: the switch names the kernel and every tensor it reads through descriptors can take one (a half
    dtype; its address, and its strides over l and over b and h, multiples of 16 bytes). A size-1 batch or head
    dimension never moves the base, so its stride does not matter."""
    buffer = torch.empty(2 * 3 * 40 * 36 + 64, dtype=torch.float16)

    def view(strides, offset=0, shape=(2, 3, 40, 32)):
        return buffer.as_strided(shape, strides, offset)

    x = view((3 * 40 * 32, 40 * 32, 32, 1))
    monkeypatch.setenv(TMA_ENV, "dq")
    assert use_tma("dq", x, x) and not use_tma("fwd", x, x) and not use_tma("dkdv", x, x)
    assert not use_tma("dq", x, view(x.stride(), offset=1))
    assert descriptor_ready(view(x.stride(), offset=8))  # 16 bytes in
    assert not descriptor_ready(view(x.stride(), offset=4))  # 8 bytes in
    assert not descriptor_ready(view((3 * 40 * 36, 40 * 36, 36, 1)))  # rows 72 bytes apart
    assert descriptor_ready(view((3, 5, 32, 1), shape=(1, 1, 40, 32)))
    assert not descriptor_ready(view((3, 5, 32, 1), shape=(1, 2, 40, 32)))  # the head stride moves the base
    assert not descriptor_ready(view((3, 32 * 40, 32, 1), shape=(2, 1, 40, 32)))  # so does the batch stride
    assert not descriptor_ready(x.float()) and descriptor_ready(x.bfloat16())
    monkeypatch.setenv(TMA_ENV, "off")
    assert not any(use_tma(kernel, x) for kernel in TMA_KERNELS)


def test_switch_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(TMA_ENV, raising=False)
    assert tma_kernels() == tma_kernels(torch.device("cpu")) == frozenset()
    if HAS_CUDA:
        hopper = torch.cuda.get_device_capability()[0] >= 9
        assert tma_kernels(torch.device("cuda")) == (DEFAULT_TMA_KERNELS if hopper else frozenset())
    for value, kernels in (("off", ()), ("all", TMA_KERNELS), ("fwd+dq", ("fwd", "dq")), ("dkdv", ("dkdv",)),
                           ("dkdv+fwd+dq", TMA_KERNELS)):
        monkeypatch.setenv(TMA_ENV, value)
        assert tma_kernels() == frozenset(kernels), value


def test_allocator_is_set_in_every_context_once():
    """Triton keeps its allocator in a ContextVar: a fresh context (a new thread, as autograd's backward thread on a
    GPU) has none until the launcher sets one, and one the caller set is kept."""

    def allocator_after_ensure():
        descriptors._ensure_allocator()
        return _allocation._allocator.get()

    assert contextvars.Context().run(allocator_after_ensure) is descriptors._scratch
    seen = []
    thread = threading.Thread(target=lambda: seen.append(allocator_after_ensure()))
    thread.start()
    thread.join()
    assert seen == [descriptors._scratch]

    def own(size, alignment, stream):
        raise AssertionError("never called here")

    def keeps_own():
        triton.set_allocator(own)
        return allocator_after_ensure()

    assert contextvars.Context().run(keeps_own) is own
