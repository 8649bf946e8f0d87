"""The backward pre-pass launched as a loop over query blocks (SLA_DIST_PREPASS=loop, configs.PREPASS_LAUNCHES):
each program takes every programs-th query block instead of one, so which program computes a block changes and
what it computes does not: every gradient equals the one-program-per-block launch's bit for bit, and the float64
reference's within the harness's error rule. The loop runs LOOP_PROGRAMS programs here (on a GPU too, where it
would run one per SM, more than these tests' blocks), so each takes several blocks and the blocks do not divide
evenly among them; the lengths leave a partial last block."""

import pytest
import torch

from sla_dist.kernels import configs
from sla_dist.kernels.block_map import predict_block_map
from sla_dist.kernels.configs import PREPASS_ENV, PREPASS_LAUNCHES, interpreting, prepass_launch
from sla_dist.kernels.op import sla_branches
from tests.utils import DEVICE

from .harness import (NAMES, KernelArgs, SLACase, assert_within_reference_error, case_block_map, compare, make_inputs,
                      run_layer)


LOOP_PROGRAMS = 3


@pytest.fixture
def few_programs(monkeypatch):
    """The loop's grid as if the device had LOOP_PROGRAMS SMs (configs.PREPASS_LOOP_PROGRAMS_PER_SM is 1)."""
    monkeypatch.setattr("sla_dist.kernels.backward_ops.multiprocessors", lambda device, interpreting: LOOP_PROGRAMS)


def _both_launches(run, monkeypatch) -> tuple[list, list]:
    """``run()``'s results with the pre-pass launched per block, then as the loop."""
    monkeypatch.setenv(PREPASS_ENV, "block")
    block = run()
    monkeypatch.setenv(PREPASS_ENV, "loop")
    loop = run()
    return block, loop


def _assert_equal(names, block, loop) -> None:
    for name, x, y in zip(names, block, loop):
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), (name, (x.double() - y.double()).abs().max())


@pytest.mark.parametrize("dtype, L, D, feature_map, linear_scope", [
    (torch.float32, 459, 32, "softmax", "marginal"),  # 8 query blocks of 64, the last of 11 rows
    (torch.float16, 459, 32, "softmax", "marginal"),  # float32 summaries (SCALED)
    (torch.float16, 333, 64, "elu", "marginal"),
    (torch.float32, 200, 32, "relu", "none"),  # no linear branch: delta only
])
def test_loop_gives_the_block_gradients(dtype, L, D, feature_map, linear_scope, monkeypatch, poison_outputs,
                                        few_programs):
    """The layer (proj_l's dO_l = dOut W made in the pre-pass, from W loaded once per looping program)."""
    c = SLACase(B=1, H=2, L=L, D=D, dtype=dtype, topk=0.25, negligible=0.2, feature_map=feature_map,
                linear_scope=linear_scope, device=DEVICE)
    inputs = make_inputs(c, torch.Generator().manual_seed(11))
    block_map = case_block_map(c, inputs)
    launches = KernelArgs("Q")
    monkeypatch.setattr("sla_dist.kernels.backward_ops.get_kernel", launches)
    block, loop = _both_launches(lambda: run_layer(c, inputs, block_map), monkeypatch)
    assert [name for name, _ in launches.seen if name.startswith("prepass")] == ["prepass", "prepass_loop"]
    _assert_equal(NAMES, block, loop)
    assert_within_reference_error(compare(c, inputs, block_map, got=loop))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loop_reads_a_stored_dol_and_the_lse_gradient(dtype, monkeypatch, poison_outputs, few_programs):
    """sla_branches: dO_l read from its buffer (HAS_DOL, no W) and a gradient of the lse (HAS_DLSE), two heads of
    two batch entries over 5 query blocks of 64 (the last of 7 rows)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, do, dol = (torch.randn(2, 2, 263, 32, generator=g).to(DEVICE, dtype) for _ in range(5))
    dlse = torch.randn(2, 2, 263, generator=g).to(DEVICE, torch.float32)
    block_map = predict_block_map(q, k, topk=0.3, negligible=0.2)

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o_s, o_l, lse = sla_branches(*leaves, block_map, feature_map="softmax", linear_scope="marginal")
        torch.autograd.backward((o_s, o_l, lse), (do, dol, dlse))
        return [t.grad for t in leaves]

    _assert_equal(("dq", "dk", "dv"), *_both_launches(run, monkeypatch))


def test_loop_takes_at_most_one_program_per_block(monkeypatch):
    """The loop's grid: PREPASS_LOOP_PROGRAMS_PER_SM x the SMs, but never more programs than query blocks."""
    monkeypatch.setattr("sla_dist.kernels.backward_ops.multiprocessors", lambda device, interpreting: 64)
    c = SLACase(B=1, H=1, L=300, D=32, dtype=torch.float32, topk=0.5, negligible=0.0, feature_map="softmax",
                linear_scope="marginal", device=DEVICE)
    inputs = make_inputs(c, torch.Generator().manual_seed(0))
    block_map = predict_block_map(inputs["q"], inputs["k"], topk=c.topk, negligible=c.negligible)
    grids = []

    class Recorder:
        def __call__(self, name):
            kernel = configs.get_kernel(name)

            class Launch:
                def __getitem__(self, grid):
                    grids.append((name, grid))
                    return kernel[grid]
            return Launch()

    monkeypatch.setattr("sla_dist.kernels.backward_ops.get_kernel", Recorder())
    monkeypatch.setenv(PREPASS_ENV, "loop")
    run_layer(c, inputs, block_map)
    assert ("prepass_loop", (5,)) in grids  # 5 query blocks of 64, fewer than 64 SMs' programs


def test_launch_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(PREPASS_ENV, raising=False)
    assert prepass_launch() == prepass_launch(torch.device("cpu")) == "block"
    if torch.cuda.is_available():  # unset: the loop where it was measured faster (compute capability 9.0 on)
        hopper = torch.cuda.get_device_capability()[0] >= 9 and not interpreting()
        assert prepass_launch(torch.device("cuda")) == ("loop" if hopper else "block")
        assert prepass_launch(torch.device("cuda"), dtype=torch.float32) == "block"
    for launch in PREPASS_LAUNCHES:
        monkeypatch.setenv(PREPASS_ENV, launch)
        assert prepass_launch() == launch
