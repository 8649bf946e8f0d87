"""dK/dV's program orders (configs.DKDV_ORDERS, SLA_DIST_DKDV_ORDER): which key block each program takes changes,
what each program computes does not, so every order gives the natural order's gradients bit for bit, and the
float64 reference's within the harness's error rule. On block maps built skewed (a few key blocks chosen by every
query block of one head, others by none, the other head near uniform), so that the sorted orders move programs
across heads, with a partial last block and odd lengths."""

import re

import pytest
import torch

from sla_dist.kernels.block_map import CRITICAL, MARGINAL, NEGLIGIBLE, build_block_map, transposed_lists
from sla_dist.kernels.configs import (DEFAULT_DKDV_ORDER, DEFAULT_SPLIT_DKDV_ORDER, DKDV_ORDER_ENV, DKDV_ORDERS,
                                     DKDV_SPLIT_ENV, LONG_FIRST_FACTOR, dkdv_order)
from sla_dist.kernels.dkdv_plan import dkdv_program_order, program_order_ref
from tests.utils import DEVICE

from .harness import NAMES, SLACase, assert_within_reference_error, compare, make_inputs, run_layer

L, BLOCK = 459, 64  # 8 query and key blocks, the last of 11 rows
HOT = (7, 2)  # head 0's key blocks chosen by every query block: the partial last one and an inner one


def skewed_map(B: int, H: int, length: int, block: int, hot: tuple[int, ...], n_critical: int, seed: int,
               block_k: int | None = None):
    """A block map over ``length`` tokens whose head 0 lists the ``hot`` key blocks in every query block's critical
    list (their programs walk every query block; the few other critical picks are random, so some key blocks are
    chosen by none) and whose other heads pick ``n_critical`` key blocks per query block at random; the rest of
    each row is marginal or negligible at random (the linear branch's scope). Query blocks of ``block`` rows, key
    blocks of ``block_k`` (default the same)."""
    block_k = block if block_k is None else block_k
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-length // block), -(-length // block_k)
    block_class = torch.where(torch.rand(B, H, nq, nk, generator=g) < 0.7, MARGINAL, NEGLIGIBLE).to(torch.int8)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                chosen = list(hot) if h == 0 else []
                others = [j for j in torch.randperm(nk, generator=g).tolist() if j not in chosen]
                block_class[b, h, i, chosen + others[: n_critical - len(chosen)]] = CRITICAL
    return build_block_map(block_class.to(DEVICE), length, length, block, block_k)


def _case(dtype: torch.dtype, linear_scope: str) -> SLACase:
    return SLACase(B=1, H=2, L=L, D=32, dtype=dtype, topk=0.0, negligible=0.0, feature_map="softmax",
                   linear_scope=linear_scope, block_q=BLOCK, block_k=BLOCK, device=DEVICE)


@pytest.mark.parametrize("order, dtype, linear_scope", [
    ("lpt", torch.float32, "marginal"), ("lpt", torch.float16, "marginal"), ("lpt-head", torch.float32, "none"),
    ("long-first", torch.float16, "marginal")])
def test_orders_give_the_natural_gradients(order, dtype, linear_scope, monkeypatch, poison_outputs):
    c = _case(dtype, linear_scope)
    block_map = skewed_map(1, 2, L, BLOCK, HOT, n_critical=3, seed=5)
    inputs = make_inputs(c, torch.Generator().manual_seed(17))
    monkeypatch.delenv(DKDV_SPLIT_ENV, raising=False)  # whole lists (lpt has no split form)
    monkeypatch.setenv(DKDV_ORDER_ENV, "natural")
    natural = run_layer(c, inputs, block_map)
    monkeypatch.setenv(DKDV_ORDER_ENV, order)
    ordered = run_layer(c, inputs, block_map)
    for name, x, y in zip(NAMES, natural, ordered):
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), (name, order, (x.double() - y.double()).abs().max())
    assert_within_reference_error(compare(c, inputs, block_map, got=ordered))


def _heads_of(order: torch.Tensor, nk: int) -> list[int]:
    return (order // nk).tolist()


def test_program_orders_put_the_longest_lists_first():
    block_map = skewed_map(1, 2, L, BLOCK, HOT, n_critical=3, seed=5)
    counts, _ = transposed_lists(block_map.block_class)
    nk = counts.shape[-1]
    flat = counts.flatten().cpu()
    assert dkdv_program_order(counts, "natural") is None
    lpt = dkdv_program_order(counts, "lpt").cpu()
    assert sorted(lpt.tolist()) == list(range(2 * nk))
    assert (flat[lpt].diff() <= 0).all(), flat[lpt]
    # head 0's hot blocks (8 query blocks each) first; equal lengths keep the grid's order, so the heads interleave
    assert lpt[:2].tolist() == sorted(HOT) and flat[lpt[0]] == 8
    assert _heads_of(lpt, nk) != sorted(_heads_of(lpt, nk))
    head = dkdv_program_order(counts, "lpt-head").cpu()
    assert _heads_of(head, nk) == [0] * nk + [1] * nk
    for h in range(2):
        part = head[h * nk:(h + 1) * nk]
        assert sorted(part.tolist()) == list(range(h * nk, (h + 1) * nk)) and (flat[part].diff() <= 0).all()
    assert head.tolist() != list(range(2 * nk)) and lpt.tolist() != head.tolist()
    first = dkdv_program_order(counts, "long-first").cpu()
    long = flat.double() * flat.numel() > LONG_FIRST_FACTOR * flat.sum().double()
    n_long = int(long.sum())
    assert 0 < n_long < 2 * nk and first[:n_long].tolist() == lpt[:n_long].tolist()
    assert not long[first[n_long:]].any()
    assert first[n_long:].diff().gt(0).all() and sorted(first.tolist()) == list(range(2 * nk))


@pytest.mark.parametrize("lists, seed", [(1, 0), (77, 1), (300, 2), (1182 * 3, 3)])
def test_long_first_kernel_matches_the_reference(lists, seed):
    """The long-first order's kernel (one launch) against its PyTorch definition, bit for bit: lengths with many
    ties, a few lists far above the mean, and list counts that are no multiple of the kernel's tiles."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (lists,), generator=gen, dtype=torch.int32)
    lengths[torch.randperm(lists, generator=gen)[: max(1, lists // 50)]] += 40
    counts = lengths.reshape(1, 1, lists).to(DEVICE)
    expected = program_order_ref(counts, "long-first")
    got = dkdv_program_order(counts, "long-first")
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), expected.cpu()), (got, expected)


@pytest.mark.parametrize("lengths, expected", [([1, 2, 1, 0], [0, 1, 2, 3]), ([1, 3, 1, 0], [1, 0, 2, 3])])
def test_long_first_rule_is_strict_and_exact(lengths, expected):
    """A list exactly at LONG_FIRST_FACTOR x the mean is not long (2 = 2 x 1 keeps the grid's order); just above,
    it goes first (3 > 2 x 1.25)."""
    counts = torch.tensor([[lengths]], dtype=torch.int32, device=DEVICE)
    for order in (dkdv_program_order(counts, "long-first"), program_order_ref(counts, "long-first")):
        assert order.tolist() == expected


def test_order_is_read_from_the_environment(monkeypatch):
    """Unset, the order is long-first for whole lists and lpt-head for the split's parts (SLA_DIST_DKDV_SPLIT=long);
    set, it is what SLA_DIST_DKDV_ORDER names either way."""
    monkeypatch.delenv(DKDV_ORDER_ENV, raising=False)
    monkeypatch.delenv(DKDV_SPLIT_ENV, raising=False)
    assert dkdv_order() == DEFAULT_DKDV_ORDER == "long-first"
    monkeypatch.setenv(DKDV_SPLIT_ENV, "long")
    assert dkdv_order() == DEFAULT_SPLIT_DKDV_ORDER == "lpt-head"
    for split in ("off", "long"):
        monkeypatch.setenv(DKDV_SPLIT_ENV, split)
        for order in DKDV_ORDERS:
            monkeypatch.setenv(DKDV_ORDER_ENV, order)
            assert dkdv_order() == order
    # Unset, the order follows the split's validated value: a bad one names itself.
    monkeypatch.delenv(DKDV_ORDER_ENV)
    monkeypatch.setenv(DKDV_SPLIT_ENV, "Long")
    with pytest.raises(ValueError, match="SLA_DIST_DKDV_SPLIT='Long'"):
        dkdv_order()


@pytest.mark.parametrize("value", ["LPT", "", "split-long", "lpt+natural"])
def test_bad_order_names_the_value(value):
    """(SLA_DIST_DKDV_ORDER's reader: tests/kernels/test_switches.py.)"""
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        dkdv_program_order(torch.zeros(1, 1, 4, dtype=torch.int32), value)
