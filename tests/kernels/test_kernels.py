"""Fused Triton SLA forward and backward against the float64 reference, over dtype x length x head dim x sparsity x
feature map x linear scope x block size. On CPU the kernels run in the Triton interpreter on a covering sample of
the grid (float32 / float16: the interpreter computes bfloat16 dots wrongly); on a GPU the whole grid runs in
bfloat16 and float16."""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from tests.utils import DEVICE, HAS_CUDA

from .grid import case_id, grid
from .harness import SLACase, assert_within_reference_error, compare, compare_query_blocks, make_inputs

AXES = dict(
    dtype=[torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32, torch.float16],
    L=[1000, 4113, 131],
    D=[64, 128],
    topk=[0.05, 0.25, 1.0],
    negligible=[0.0, 0.1],
    feature_map=["softmax", "elu", "relu"],
    linear_scope=["marginal", "all", "none"],
    block_q=[64, 128],
)


def _valid(case) -> bool:
    if case["topk"] + case["negligible"] > 1.0:
        return False
    # In the interpreter a long sequence is affordable only at high sparsity.
    return HAS_CUDA or case["L"] < 4000 or case["topk"] <= 0.05


CASES = grid(AXES, cpu_size=24, on_gpu=HAS_CUDA, keep=_valid)


def _heads(case) -> int:
    # The dense reference materialises [L, L] per head: keep the long CPU cases to one head.
    return 2 if HAS_CUDA or case["L"] < 4000 else 1


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_sla_matches_float64_reference(case, poison_outputs):
    c = SLACase(B=1, H=_heads(case), device=DEVICE, **case)
    seed = case_seed(case)
    print(f"inputs seeded with {seed} (case {case_id(case)})")  # shown by pytest when the case fails
    assert_within_reference_error(compare(c, make_inputs(c, torch.Generator().manual_seed(seed))))


def case_seed(case) -> int:
    """The inputs' seed: a checksum of the case id, the same in every process (``hash`` of a str is salted per
    process, so a failure could not be reproduced)."""
    return zlib.crc32(case_id(case).encode())


def test_case_seeds_are_the_same_in_every_process():
    code = "from tests.kernels.test_kernels import CASES, case_seed; print([case_seed(c) for c in CASES])"
    seeds = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": salt}, cwd=Path(__file__).parents[2]).stdout
             for salt in ("1", "2")}
    assert len(seeds) == 1 and seeds != {"[]\n"}, seeds


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [32760, 75600])
def test_long_sequences_on_gpu(dtype, L, poison_outputs):
    """The Wan shapes' lengths at 95% sparsity with the paper's settings. A dense [L, L] float64 reference does not
    fit, so the loss reads four query blocks (first, two inner, the partial last): the reference needs only their
    rows, and dk, dv, dproj still collect every key block those rows touch."""
    c = SLACase(B=1, H=2, L=L, D=128, dtype=dtype, topk=0.05, negligible=0.1, feature_map="softmax",
                linear_scope="marginal", block_q=128, device=DEVICE)
    assert_within_reference_error(compare_query_blocks(c, make_inputs(c, torch.Generator().manual_seed(L)),
                                                       blocks=[0, 37, 100, -1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float16])
def test_single_token_tail_block(dtype, poison_outputs):
    """L = 129: the last key block holds one token, its smooth-K mean is ~8x larger than a full block's, so many
    query blocks rank it first. (In float32 the reference is exact on rows attending that single key, where any
    kernel's rounding is then the whole error, so the ratio rule is checked in the half dtypes.)"""
    c = SLACase(B=2, H=2, L=129, D=64, dtype=dtype, topk=0.25, negligible=0.1, feature_map="softmax",
                linear_scope="marginal", device=DEVICE)
    assert_within_reference_error(compare(c, make_inputs(c, torch.Generator().manual_seed(129))))
