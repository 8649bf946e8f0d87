"""dK/dV with long query-block lists split over several programs (SLA_DIST_DKDV_SPLIT=long, kernels/dkdv_plan.py).

The plan kernel must make exactly split_plan_reference's plan; the reference's plan must take every listed query
block once, with parts no longer than its part length and the split lists' parts in their own scratch slots; and
the split backward's gradients must be within the harness's rule of the float64 reference (not bit for bit equal
to the whole-list kernel's: a split list's dK, dV are float32 sums of partial sums). The block maps have key blocks
chosen by every query block of one head (the partial last one among them), so their lists split."""

import re

import pytest
import torch

from sla_dist import SLAConfig, SparseLinearAttention, predict_block_map, sla_branches, sparse_linear_attention
from sla_dist.kernels import configs, dkdv_plan
from sla_dist.kernels.block_map import transposed_lists
from sla_dist.kernels.configs import DKDV_CHUNKS_ENV, DKDV_ORDER_ENV, DKDV_SPLIT_ENV, dkdv_split
from sla_dist.kernels.dkdv_plan import SPLIT_ORDERS, dkdv_split_plan, split_plan_reference
from tests.utils import DEVICE, HAS_CUDA

from .harness import (NAMES, KernelArgs, SLACase, assert_within_reference_error, compare, layer_step, make_inputs,
                      relative_error, run_layer)
from .test_dkdv_order import skewed_map

L, BLOCK = 1523, 64  # 24 query and key blocks, the last of 51 rows
HOT = (23, 5)  # head 0's key blocks chosen by every query block: 24-long lists


def _random_lengths(generator: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """(lengths [heads, Nk], sms, slots): mostly short lists, a few up to Nq long, some empty."""
    heads, nk, nq = (int(torch.randint(lo, hi, (1,), generator=generator)) for lo, hi in ((1, 5), (1, 40), (1, 60)))
    n = torch.randint(0, 4, (heads, nk), generator=generator)
    hot = torch.rand(heads, nk, generator=generator) < 0.15
    n = torch.where(hot, torch.randint(0, nq + 1, (heads, nk), generator=generator), n).clamp(max=nq)
    sms, slots = (int(torch.randint(lo, hi, (1,), generator=generator)) for lo, hi in ((1, 40), (2, 40)))
    return n.int().to(DEVICE), sms, slots


@pytest.mark.parametrize("rows", [dkdv_plan.PLAN_ROWS, 8])
@pytest.mark.parametrize("order", SPLIT_ORDERS)
def test_plan_kernel_makes_the_reference_plan(order, rows, monkeypatch):
    """(rows 8: up to 5 programs per head, comparisons over up to 10 steps of 4 lists.)"""
    monkeypatch.setattr(dkdv_plan, "DKDV_SPLIT_MIN_PART", 2)  # parts of a few blocks: many splits
    monkeypatch.setattr(dkdv_plan, "PLAN_ROWS", rows)
    monkeypatch.setattr(dkdv_plan, "PLAN_COLS", min(rows, dkdv_plan.PLAN_COLS) // 2)
    g = torch.Generator().manual_seed(SPLIT_ORDERS[order] + rows)
    for _ in range(12):
        lengths, sms, slots = _random_lengths(g)
        got, want = dkdv_split_plan(lengths, order, sms, slots), split_plan_reference(lengths, order, sms, slots)
        assert int(got.part) == int(want.part), (lengths, sms, slots)
        assert torch.equal(got.work, want.work), (lengths, sms, slots, got.work.T, want.work.T)
        assert torch.equal(got.combine, want.combine), (lengths, sms, slots, got.combine.T, want.combine.T)


@pytest.mark.parametrize("order", SPLIT_ORDERS)
def test_reference_plan_takes_every_listed_block_once(order, monkeypatch):
    monkeypatch.setattr(dkdv_plan, "DKDV_SPLIT_MIN_PART", 2)
    g = torch.Generator().manual_seed(10 + SPLIT_ORDERS[order])
    split_seen = False
    for _ in range(40):
        lengths, sms, slots = _random_lengths(g)
        nk = lengths.shape[-1]
        plan = split_plan_reference(lengths, order, sms, slots)
        work, combine, part = plan.work.tolist(), plan.combine.tolist(), int(plan.part)
        assert len(work) == lengths.numel() + slots and len(combine) == slots // 2
        used = [row for row in work if row[0] >= 0]
        assert all(row == [-1, 0, 0, -1] for row in work[len(used):])  # the unused programs last
        assert all(row == [-1, 0, 0] for row in combine if row[0] < 0)
        slots_taken = []
        for i, n in enumerate(lengths.flatten().tolist()):
            rows = sorted((row for row in used if row[0] == i), key=lambda row: row[1])
            assert [row[1] for row in rows] == [r * part for r in range(len(rows))]  # consecutive parts
            assert sum(row[2] for row in rows) == n and all(0 <= row[2] <= part for row in rows)
            assert len(rows) == max(1, -(-n // part))
            if len(rows) == 1:
                assert rows[0][3] == -1  # a whole list writes dk, dv itself
            else:
                split_seen = True
                assert [row[3] for row in rows] == list(range(rows[0][3], rows[0][3] + len(rows)))
                assert [i, rows[0][3], len(rows)] in combine
                slots_taken += [row[3] for row in rows]
        assert sorted(slots_taken) == list(range(len(slots_taken))) and len(slots_taken) <= slots
        counts = [row[2] for row in used]
        if order == "lpt-head":
            heads = [row[0] // nk for row in used]
            assert heads == sorted(heads)
            assert all(a >= b for a, b, h, k in zip(counts, counts[1:], heads, heads[1:]) if h == k)
        elif order == "natural":
            assert [row[0] for row in used] == sorted(row[0] for row in used)
        else:
            long = [c * len(used) > configs.LONG_FIRST_FACTOR * sum(counts) for c in counts]
            assert long == sorted(long, reverse=True)
    assert split_seen


def _case(dtype: torch.dtype, linear_scope: str, B: int = 1) -> SLACase:
    return SLACase(B=B, H=2, L=L, D=32, dtype=dtype, topk=0.0, negligible=0.0, feature_map="softmax",
                   linear_scope=linear_scope, block_q=BLOCK, block_k=BLOCK, device=DEVICE)


# Scope 'all' gives the split lists a linear term (dh_j sums over the query blocks for which j is marginal, and the
# hot key blocks are critical for all of head 0's): the one their first part must add, and no other part.
@pytest.mark.parametrize("order, dtype, linear_scope", [
    ("lpt-head", torch.float32, "all"), ("lpt-head", torch.float16, "marginal"),
    ("long-first", torch.float16, "all"), ("natural", torch.float32, "none")])
def test_split_gradients_are_within_the_reference_error(order, dtype, linear_scope, monkeypatch, poison_outputs):
    c = _case(dtype, linear_scope)
    block_map = skewed_map(1, 2, L, BLOCK, HOT, n_critical=3, seed=5)
    inputs = make_inputs(c, torch.Generator().manual_seed(17))
    monkeypatch.setenv(DKDV_ORDER_ENV, order)
    monkeypatch.delenv(DKDV_SPLIT_ENV, raising=False)
    whole = run_layer(c, inputs, block_map)
    monkeypatch.setenv(DKDV_SPLIT_ENV, "long")
    launches = KernelArgs("SCRATCH")
    monkeypatch.setattr("sla_dist.kernels.backward_ops.get_kernel", launches)
    split = run_layer(c, inputs, block_map)
    assert [name for name, _ in launches.seen] == ["dkdv", "dkdv_combine"]
    lengths, _ = transposed_lists(block_map.block_class)
    plan = split_plan_reference(lengths, order, configs.multiprocessors(DEVICE, configs.interpreting()))
    assert int(plan.part) < int(lengths.max()) and (plan.combine[:, 0] >= 0).sum() >= 2  # lists were split
    for name, x, y in zip(NAMES, whole, split):
        assert (x is None) == (y is None), name
        if x is not None and name not in ("dk", "dv"):
            assert torch.equal(x, y), name  # only dK/dV changes
    assert_within_reference_error(compare(c, inputs, block_map, got=split))


def test_split_over_chunks_of_heads(monkeypatch, poison_outputs):
    """With SLA_DIST_DKDV_CHUNKS each launch plans its own heads, the combine writes them from BH_FIRST on."""
    c = _case(torch.float32, "marginal", B=2)
    block_map = skewed_map(2, 2, L, BLOCK, HOT, n_critical=3, seed=6)
    inputs = make_inputs(c, torch.Generator().manual_seed(18))
    monkeypatch.setenv(DKDV_SPLIT_ENV, "long")
    monkeypatch.setenv(DKDV_ORDER_ENV, "lpt-head")
    monkeypatch.setenv(DKDV_CHUNKS_ENV, "auto")
    monkeypatch.setattr("sla_dist.kernels.backward_ops.dkdv_head_chunks", lambda bh, *sizes: ((0, 1), (1, 3), (3, bh)))
    launches = KernelArgs("BH_FIRST")
    monkeypatch.setattr("sla_dist.kernels.backward_ops.get_kernel", launches)
    got = run_layer(c, inputs, block_map)
    assert launches.seen == [(name, first) for first in (0, 1, 3) for name in ("dkdv", "dkdv_combine")]
    assert_within_reference_error(compare(c, inputs, block_map, got=got))


@pytest.mark.parametrize("layer_split, env, launched", [("long", None, True), ("off", "long", False),
                                                        ("env", "long", True)])
def test_a_layer_chooses_its_own_split(layer_split, env, launched, block_map_kernels, monkeypatch):
    """SLAConfig.dkdv_split ('long', 'off') decides for its layer whatever SLA_DIST_DKDV_SPLIT says ('env': the
    switch), and the compiled backward's dK/dV op runs the split as the eager backward does: same launches, same
    gradients bit for bit (parts of two query blocks: SMs and the fewest part blocks patched so that 4-block lists
    split)."""
    if env is None:
        monkeypatch.delenv(DKDV_SPLIT_ENV, raising=False)
    else:
        monkeypatch.setenv(DKDV_SPLIT_ENV, env)
    monkeypatch.setenv(DKDV_ORDER_ENV, "long-first")
    monkeypatch.setattr(configs, "INTERPRETER_SMS", 64)
    monkeypatch.setattr(dkdv_plan, "DKDV_SPLIT_MIN_PART", 2)
    torch._dynamo.reset()
    launches = KernelArgs("BH_FIRST")
    monkeypatch.setattr("sla_dist.kernels.backward_ops.get_kernel", launches)
    torch.manual_seed(0)
    layer = SparseLinearAttention(32, topk=0.5, negligible=0.25, backend="triton", dkdv_split=layer_split)
    torch.nn.init.normal_(layer.proj_l.weight, std=0.2)
    layer = layer.to(DEVICE)
    g = torch.Generator().manual_seed(4)
    q, k, v, grad = (torch.randn(1, 2, 459, 32, generator=g).to(DEVICE) for _ in range(4))
    want = layer_step(layer, q, k, v, grad)
    assert launches.seen == [("dkdv", 0)] + [("dkdv_combine", 0)] * launched
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    layer_step(compiled, q, k, v, grad)  # compiles
    launches.seen.clear()
    got = layer_step(compiled, q, k, v, grad)
    assert launches.seen == [("dkdv", 0)] + [("dkdv_combine", 0)] * launched
    for name, a, b in zip(("out", "dq", "dk", "dv", "dproj_w"), got, want):
        assert torch.equal(a, b), (name, (a - b).abs().max())


@pytest.mark.parametrize("bad", ["Long", "on", None, True])
def test_bad_layer_split_is_named(bad):
    with pytest.raises(ValueError, match="dkdv_split"):
        SLAConfig(dkdv_split=bad)
    with pytest.raises(ValueError, match="dkdv_split"):
        SparseLinearAttention(32, dkdv_split=bad)
    q, k, v = (torch.randn(1, 1, 130, 32, device=DEVICE) for _ in range(3))
    block_map = predict_block_map(q, k, topk=0.5, negligible=0.0)
    for call in (lambda: sparse_linear_attention(q, k, v, block_map, dkdv_split=bad),
                 lambda: sla_branches(q, k, v, block_map, dkdv_split=bad)):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            call()


def test_lpt_has_no_split_form():
    with pytest.raises(ValueError, match=re.escape("'lpt'")):
        dkdv_split_plan(torch.ones(1, 8, dtype=torch.int32, device=DEVICE), "lpt", 4)
    with pytest.raises(ValueError, match="slots=1"):
        split_plan_reference(torch.ones(1, 8, dtype=torch.int32), "natural", 4, slots=1)


def test_split_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv(DKDV_SPLIT_ENV, raising=False)
    assert not dkdv_split()
    for value in configs.DKDV_SPLITS:
        monkeypatch.setenv(DKDV_SPLIT_ENV, value)
        assert dkdv_split() == (value == "long")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("order, dtype, D", [
    ("lpt-head", torch.bfloat16, 128), ("long-first", torch.bfloat16, 128), ("lpt-head", torch.float16, 128),
    ("lpt-head", torch.bfloat16, 64), ("natural", torch.float16, 64)])
def test_split_on_a_gpu(order, dtype, D, monkeypatch):
    """The layer's tiles (BQ 128, BK 64, compiled for the GPU), a map whose three hot key blocks every query block
    of head 0 chose (64-long lists against a mean of 3), scope 'all' (the split lists' linear term): the split's
    gradients against the whole-list kernel's and the float64 reference's."""
    length = 8192 - 37
    c = SLACase(B=1, H=4, L=length, D=D, dtype=dtype, topk=0.0, negligible=0.0, feature_map="softmax",
                linear_scope="all", block_q=128, block_k=64, device=DEVICE)
    block_map = skewed_map(1, 4, length, 128, (127, 40, 3), n_critical=6, seed=7, block_k=64)
    inputs = make_inputs(c, torch.Generator().manual_seed(3))
    monkeypatch.setenv(DKDV_ORDER_ENV, order)
    monkeypatch.delenv(DKDV_SPLIT_ENV, raising=False)
    whole = run_layer(c, inputs, block_map)
    monkeypatch.setenv(DKDV_SPLIT_ENV, "long")
    split = run_layer(c, inputs, block_map)
    lengths, _ = transposed_lists(block_map.block_class)
    plan = split_plan_reference(lengths, order, configs.multiprocessors(DEVICE, False))
    assert int(plan.part) < int(lengths.max())  # lists were split
    for name, x, y in zip(NAMES, whole, split):
        assert relative_error(y, x.double()) < 1e-2, (name, relative_error(y, x.double()))
    assert_within_reference_error(compare(c, inputs, block_map, got=split))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_split_layer_replays_in_a_cuda_graph(monkeypatch):
    """The plan is made on the GPU with fixed shapes: the split backward captures and replays."""
    monkeypatch.setenv(DKDV_SPLIT_ENV, "long")
    monkeypatch.setenv(DKDV_ORDER_ENV, "lpt-head")
    torch.manual_seed(0)
    layer = SparseLinearAttention(64, topk=0.1, BLKQ=128).to(DEVICE)
    torch.nn.init.normal_(layer.proj_l.weight, std=0.1)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q, k, v, grad = (torch.randn(2, 3, 4096, 64, generator=g, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
    want = layer_step(layer, q, k, v, grad)
    graphed = torch.cuda.make_graphed_callables(layer, tuple(t.clone().requires_grad_() for t in (q, k, v)))
    got = layer_step(graphed, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dproj_w"), got, want):
        assert relative_error(a, b.double()) < 1e-2, (name, relative_error(a, b.double()))
