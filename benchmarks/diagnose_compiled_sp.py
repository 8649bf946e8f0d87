"""Localise the compiled SP=2 gradient mismatch (issue #12): which setting breaks which tensor, and by how much.

The model, batch and loss are those of ``tests/lightning/test_sequence.py::test_sp2_gradients_equal_sp1`` (a tiny
DiT, layer 0 dense, the rest SLA, a teacher term). Two ranks each run every setting below and compare it with the
eager SP=1 model on the same device (computed once per numerics: kernel dtype, SLA and SDPA backends):

* per block: the block's output (forward hooks; SP=2 shards gathered, padding dropped);
* per SLA layer: its input q, k and output (hooks on the SLA module, which under SP=2 sees its heads over the whole
  sequence, exactly what SP=1 gives those heads), and how many block-map entries differ when both maps are
  predicted again, eagerly, from the recorded q and k (a flipped top-k choice moves the output by far more than
  rounding does);
* per parameter: the gradient, summed over the SP group as ZeRO does;
* on GPU, ``torch.library.opcheck`` of the SLA custom op on the inputs (layouts included) each compiled run gave it:
  fake vs real output metadata, autograd registration, AOTAutograd vs eager.

Settings isolate the hypotheses: SP=1 compiled (compile alone, no exchange), the exchange (fused / DeepSpeed, for
the SLA and the dense layers alike; under torch.compile the fused one is traced as functional collectives, and
``-ds`` settings compile DeepSpeed's, what issue #12 ran), the compile backend
(``aot_eager`` as the test, ``eager`` = Dynamo only, no AOTAutograd), activation checkpointing on / off, the kernels
in float32 instead of bfloat16 (``run_dtype`` patched), the SLA reference backend (no Triton custom ops at all), the
dense layer's SDPA on its math backend, and a device synchronisation around every Ulysses exchange (a graph break
there). ``sp2-eager-perturbed`` nudges the last block's weights: it must FAIL, from that block on. The last lines
are a table.

    python benchmarks/diagnose_compiled_sp.py                 # 2 GPUs, NCCL: the QUICK settings
    python benchmarks/diagnose_compiled_sp.py --all           # every setting
    python benchmarks/diagnose_compiled_sp.py --cpu           # smoke test: 2 processes, gloo
    python benchmarks/diagnose_compiled_sp.py --cpu --cpu-kernels --only sp2-aot-ckpt   # the custom ops, interpreted
    python benchmarks/diagnose_compiled_sp.py --only sp2-aot-ckpt sp1-aot-ckpt --seeds 0 1 2
    python benchmarks/diagnose_compiled_sp.py --blocking      # CUDA_LAUNCH_BLOCKING=1, TORCH_NCCL_BLOCKING_WAIT=1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--cpu-kernels" in sys.argv[1:]:  # Triton reads it once, when importing torch imports Triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    sp: int
    backend: str | None = None
    """torch.compile backend of each block (apply_compile), None for eager."""
    checkpoint: bool = True
    exchange: str = "fused"
    fp32_kernels: bool = False
    """float32 inputs run the kernels in float32 rather than bfloat16 (SparseLinearAttention.run_dtype)."""
    sla_backend: str = "auto"
    sync: bool = False
    """device synchronisation before and after every Ulysses exchange (a graph break under compile; inside a
    checkpointed block that break runs the whole block body eagerly, so use it without checkpointing)."""
    math_sdpa: bool = False
    """the dense layer's scaled_dot_product_attention on the math backend (not flash / memory-efficient)"""
    hooks: bool = True
    perturb: bool = False
    """the last block's weights nudged by 1e-2 (a known fault the table must show)"""
    """record block and SLA outputs (off: gradients only, the compiled graph exactly the test's)"""

    @property
    def numerics(self) -> tuple[bool, str, bool]:
        return self.fp32_kernels, self.sla_backend, self.math_sdpa


SETTINGS = [
    Setting("sp1-aot-ckpt", 1, "aot_eager"),  # compile alone: no exchange at all
    Setting("sp2-eager-fused-ckpt", 2),  # the eager controls (the CUDA test passes these)
    Setting("sp2-eager-ds-ckpt", 2, exchange="deepspeed"),
    Setting("sp2-aot-ckpt-ds", 2, "aot_eager", exchange="deepspeed"),  # issue #12: DeepSpeed's exchange compiled
    Setting("sp2-aot-ckpt-ds-again", 2, "aot_eager", exchange="deepspeed"),  # reproducible, or a race?
    Setting("sp2-aot-ckpt-ds-nohooks", 2, "aot_eager", exchange="deepspeed", hooks=False),  # the graph of the test
    Setting("sp2-aot-nockpt-ds", 2, "aot_eager", checkpoint=False, exchange="deepspeed"),
    Setting("sp2-dynamo-ckpt-ds", 2, "eager", exchange="deepspeed"),  # Dynamo only, no AOTAutograd
    Setting("sp2-aot-ckpt-ds-fp32", 2, "aot_eager", exchange="deepspeed", fp32_kernels=True),
    Setting("sp2-aot-ckpt-ds-refsla", 2, "aot_eager", exchange="deepspeed", sla_backend="reference"),
    Setting("sp2-aot-ckpt-ds-mathsdpa", 2, "aot_eager", exchange="deepspeed", math_sdpa=True),
    # without checkpointing: a graph break inside a checkpointed body runs that whole body eagerly
    Setting("sp2-aot-nockpt-ds-sync", 2, "aot_eager", checkpoint=False, exchange="deepspeed", sync=True),
    Setting("sp2-aot-ckpt", 2, "aot_eager"),  # the fused exchange traced (functional collectives): the fix
    Setting("sp2-aot-nockpt", 2, "aot_eager", checkpoint=False),
    Setting("sp2-aot-ckpt-fp32", 2, "aot_eager", fp32_kernels=True),
    Setting("sp2-eager-ckpt-fp32", 2, fp32_kernels=True),
    Setting("sp2-eager-perturbed", 2, perturb=True),  # the tool's own check: must FAIL from the last block on
]

QUICK = ("sp1-aot-ckpt", "sp2-eager-ds-ckpt", "sp2-aot-ckpt-ds", "sp2-aot-ckpt-ds-again", "sp2-aot-nockpt-ds",
         "sp2-aot-ckpt-ds-fp32", "sp2-aot-ckpt-ds-refsla", "sp2-aot-ckpt-ds-mathsdpa", "sp2-aot-ckpt")
"""The default run (about 2 minutes on 2 H200s): one setting per hypothesis and the fix; ``--all`` runs every one."""


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float32."""
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


@torch.compiler.disable
def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _Patches:
    """The class-level switches a setting needs, undone on exit."""

    def __init__(self, setting: Setting) -> None:
        self.setting, self.saved = setting, []
        self.sdpa = None

    def _set(self, owner, name, value) -> None:
        self.saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    def __enter__(self) -> "_Patches":
        from sla_dist import SparseLinearAttention
        from sla_dist.lightning.sequence import ShardedDense
        from sla_dist.parallel import SequenceParallelSLA

        if self.setting.fp32_kernels:
            self._set(SparseLinearAttention, "run_dtype", lambda layer, q: q.dtype)
        if self.setting.sync:
            for owner, name in ((SequenceParallelSLA, "forward"), (ShardedDense, "__call__")):
                self._set(owner, name, _synchronized(owner.__dict__[name]))
        if self.setting.math_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            self.sdpa = sdpa_kernel(SDPBackend.MATH)
            self.sdpa.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.sdpa is not None:
            self.sdpa.__exit__(*exc)
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)


def _synchronized(call):
    def wrapper(*args, **kwargs):
        _synchronize()
        out = call(*args, **kwargs)
        _synchronize()
        return out

    return wrapper


@dataclasses.dataclass
class Record:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    blocks: list[torch.Tensor]
    """each block's output over the whole sequence [B, L, C]"""
    sla: list[tuple[torch.Tensor, ...]]
    """(q, k, v, out) of each SLA layer's call, this rank's heads (all of them at SP=1)"""
    graph_breaks: int
    seconds: float


def _run(setting: Setting, reference, batch: dict, groups) -> Record:
    """One forward and backward of a copy of ``reference`` (a DiTModule) under ``setting``."""
    from torch._dynamo.utils import counters

    from sla_dist import SparseLinearAttention
    from sla_dist.models import apply_compile
    from sla_dist.parallel import SequenceShard
    from sla_dist.lightning.sequence import enable_sequence_parallel
    from tests.lightning.test_sequence import _grads

    torch._dynamo.reset()
    counters.clear()
    module = copy.deepcopy(reference)
    for model in (module.model, module.teacher):
        model.config = dataclasses.replace(model.config, checkpoint_blocks=setting.checkpoint)
        for layer in model.modules():
            if isinstance(layer, SparseLinearAttention):
                layer.config = dataclasses.replace(layer.config, backend=setting.sla_backend)
    if setting.perturb:
        torch.manual_seed(123)
        with torch.no_grad():
            for p in module.model.blocks[-1].parameters():
                p.add_(torch.randn_like(p) * 1e-2)
    sp_groups = groups if setting.sp == 2 else None
    if sp_groups is not None:
        for model in (module.model, module.teacher):
            enable_sequence_parallel(model, groups)
            for attn in model.modules():
                if getattr(attn, "parallel", None) is not None:  # SequenceParallelSLA or ShardedDense
                    attn.parallel.exchange = setting.exchange
    blocks: list[torch.Tensor] = []
    sla: list[tuple[torch.Tensor, ...]] = []
    for block in module.model.blocks if setting.hooks else ():
        block.register_forward_hook(lambda m, args, out: blocks.append(out.detach()))
    for layer in module.model.modules():
        if setting.hooks and isinstance(layer, SparseLinearAttention):
            layer.register_forward_hook(lambda m, args, out: sla.append((*(x.detach() for x in args[:3]),
                                                                         out.detach())))
    if setting.backend is not None:
        apply_compile(module.model, backend=setting.backend)
    start = time.perf_counter()
    with _Patches(setting):
        # forward and backward; eager checkpointing calls the SLA layers again in backward: those records (past the
        # forward's count) are dropped below
        grads, loss = _grads(module, batch, sp_groups)
    if sp_groups is not None:
        for grad in grads.values():
            dist.all_reduce(grad, group=groups.sp_group)
    seconds = time.perf_counter() - start
    n_blocks = len(module.model.blocks)
    blocks = blocks[:n_blocks]
    sla = sla[:sum(isinstance(m, SparseLinearAttention) for m in module.model.modules())]
    if sp_groups is not None:
        seq_len = _reference_len(batch, reference)
        shard = SequenceShard.for_group(seq_len, groups.sp_group)
        blocks = [shard.gather(b, 1) for b in blocks]
    breaks = sum(counters["graph_break"].values())
    return Record(loss, grads, blocks, sla, breaks, seconds)


def _reference_len(batch: dict, module) -> int:
    """Tokens in the model's sequence for the batch's latents."""
    T, H, W = module.model.token_grid(tuple(batch["latents"].shape))
    return T * H * W


def _flips(layer, q_got, k_got, q_want, k_want) -> int:
    """Block-map entries that differ between the maps predicted (eagerly) from the two q, k."""
    got = layer._prepare(q_got, k_got, k_got)[3].block_class
    want = layer._prepare(q_want, k_want, k_want)[3].block_class
    return int((got != want).sum())


def _compare(setting: Setting, got: Record, want: Record, sla_layers: list, rank: int, sp: int) -> dict:
    row = {"loss": _rel(got.loss, want.loss), "breaks": got.graph_breaks, "s": got.seconds}
    errs = [_rel(g, w) for g, w in zip(got.blocks, want.blocks)]
    row["block"] = max(range(len(errs)), key=errs.__getitem__, default=-1)
    row["block_err"] = errs[row["block"]] if errs else float("nan")
    row["blocks"] = errs
    sla_rows = []
    for layer, (q, k, _, o), (qw, kw, _, ow) in zip(sla_layers, got.sla, want.sla):
        if sp == 2:  # this rank's heads of the SP=1 call
            h = q.shape[1]
            qw, kw, ow = (x[:, rank * h:(rank + 1) * h] for x in (qw, kw, ow))
        sla_rows.append((_rel(q, qw), _rel(o, ow), _flips(layer, q, k, qw, kw)))
    row["sla"] = sla_rows
    grad_errs = {n: _rel(got.grads[n], want.grads[n]) for n in want.grads}
    row["param"] = max(grad_errs, key=grad_errs.get)
    row["grad_err"] = grad_errs[row["param"]]
    row["grads"] = grad_errs
    return row


def opcheck_sla(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, str]:
    """torch.library.opcheck of the SLA forward custom op on these inputs, as the layer calls it (run dtype, strides,
    block map): the fake's output metadata against the real op's, the autograd registration, and AOTAutograd's
    forward and backward against eager. {} where the layer does not run the kernels (CPU)."""
    if not layer.uses_kernels(q.device):
        return {}
    q, k, v, block_map = layer._prepare(q, k, v)
    c = layer.config
    tensors = [x.detach().requires_grad_() for x in (q, k, v)]
    args = (*tensors, block_map.block_class, block_map.kv_num_blocks.contiguous(), block_map.kv_indices.contiguous(),
            block_map.block_q, block_map.block_k, c.feature_map, c.linear_scope, c.linear_sums, c.dkdv_split)
    if layer.fuses_projection(q.device):
        op = torch.ops.sla_dist.sla_projected_forward.default
        args += tuple(p.detach().clone().requires_grad_() for p in (layer.proj_l.weight, layer.proj_l.bias))
    else:
        op = torch.ops.sla_dist.sla_forward.default
    return torch.library.opcheck(op, args, raise_exception=False)


def _force_kernels() -> None:
    """The SLA layers and their block maps on the Triton kernels on CPU too (with TRITON_INTERPRET=1)."""
    from sla_dist import SparseLinearAttention
    from sla_dist.kernels import block_map

    on_kernels = block_map._on_kernels
    block_map._on_kernels = lambda x, kernels: on_kernels(x, True if kernels is None else kernels)
    SparseLinearAttention.uses_kernels = lambda layer, device: layer.config.backend != "reference"


def worker(device: torch.device, names: list[str], seeds: list[int], tolerance: float, kernels: bool) -> None:
    from sla_dist import SparseLinearAttention
    from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups
    from tests.lightning.test_sequence import LATENT_SHAPE, _module

    if kernels:
        _force_kernels()
    torch._dynamo.config.cache_size_limit = 64
    # the SLA hooks run inside the checkpointed block: without this their list appends break the checkpoint's graph
    # (then run eagerly), which is not what the test compiles
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    rank = dist.get_rank()
    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2))
    settings = [s for s in SETTINGS if s.name in names]
    table = []
    for seed in seeds:
        torch.manual_seed(seed)
        batch = {"latents": torch.randn(LATENT_SHAPE, device=device), "text": torch.randn(2, 5, 32, device=device),
                 "index": torch.arange(2)}
        reference = _module(seed, teacher=True, device=device)
        sla_layers = [m for m in reference.model.modules() if isinstance(m, SparseLinearAttention)]
        references: dict[tuple, Record] = {}
        opchecked: set[tuple] = set()
        for setting in settings:
            if setting.numerics not in references:
                base = Setting("sp1-eager-reference", 1, checkpoint=False, fp32_kernels=setting.fp32_kernels,
                               sla_backend=setting.sla_backend, math_sdpa=setting.math_sdpa)
                references[setting.numerics] = _run(base, reference, batch, groups)
            try:
                got = _run(setting, reference, batch, groups)
            except Exception as error:  # one setting failing must not hide the others' results
                print(f"[rank {rank}] seed {seed} {setting.name}: {type(error).__name__}: {error}", flush=True)
                table.append((seed, setting, None))
                continue
            row = _compare(setting, got, references[setting.numerics], sla_layers, rank, setting.sp)
            table.append((seed, setting, row))
            if rank == 0:
                blocks = " ".join(f"{e:.1e}" for e in row["blocks"])
                sla = " ".join(f"q{q:.0e}/o{o:.0e}/f{f}" for q, o, f in row["sla"])
                print(f"seed {seed} {setting.name}: blocks [{blocks}] sla [{sla}]", flush=True)
                worst = sorted(row["grads"].items(), key=lambda kv: -kv[1])[:4]
                print("    worst grads: " + ", ".join(f"{n} {e:.2e}" for n, e in worst), flush=True)
            layouts = (setting.sp, setting.exchange, setting.fp32_kernels)
            if setting.backend is not None and setting.hooks and layouts not in opchecked:
                # the SLA op on the inputs (layouts included) it saw in this compiled run, once per layout; on both
                # ranks, so that neither waits on the other's checks inside a collective
                opchecked.add(layouts)
                for layer, (q, k, v, _) in zip(sla_layers, got.sla):
                    try:
                        with _Patches(setting):
                            checks = opcheck_sla(layer, q, k, v)
                    except Exception as error:  # report it; the table still comes
                        checks = {"opcheck": f"{type(error).__name__}: {error}"}
                    if checks and rank == 0:
                        print(f"    opcheck {tuple(q.shape)} strides {q.stride()}: {checks}", flush=True)
    dist.barrier()
    if rank == 0:
        _print_table(table, tolerance)


def _print_table(table: list, tolerance: float) -> None:
    print(f"\nrelative max errors vs eager SP=1 on this device (FAIL: a gradient above {tolerance:g}); flips: "
          f"block-map entries that differ, per SLA layer (rank 0's heads)")
    header = (f"{'seed':>4} {'setting':<22} {'loss':>8} {'worst block':>14} {'sla out':>8} {'flips':>8} "
              f"{'grad':>8}  {'worst parameter':<40} {'breaks':>6} {'s':>5}")
    print(header)
    for seed, setting, row in table:
        if row is None:
            print(f"{seed:>4} {setting.name:<22} ERROR")
            continue
        sla_out = max((o for _, o, _ in row["sla"]), default=0.0)
        flips = ",".join(str(f) for _, _, f in row["sla"])
        status = "FAIL" if row["grad_err"] > tolerance else "ok"
        print(f"{seed:>4} {setting.name:<22} {row['loss']:8.1e} {row['block_err']:8.1e} (b{row['block']}) "
              f"{sla_out:8.1e} {flips:>8} {row['grad_err']:8.1e}  {row['param']:<40} {row['breaks']:>6} "
              f"{row['s']:5.1f} {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="2 CPU processes over gloo (a smoke test)")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in SETTINGS], help="settings to run")
    parser.add_argument("--all", action="store_true", help="every setting (default: QUICK)")
    parser.add_argument("--cpu-kernels", action="store_true",
                        help="with --cpu: the SLA kernels and their custom ops in Triton's interpreter (slow)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--blocking", action="store_true",
                        help="CUDA_LAUNCH_BLOCKING=1 and TORCH_NCCL_BLOCKING_WAIT=1 in the workers (a race check)")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if args.cpu_kernels and not args.cpu:
        parser.error("--cpu-kernels goes with --cpu (on GPUs the kernels run anyway)")
    if device == "cuda" and torch.cuda.device_count() < 2:
        parser.error(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}; use --cpu for the smoke test")
    if args.blocking:
        os.environ.update(CUDA_LAUNCH_BLOCKING="1", TORCH_NCCL_BLOCKING_WAIT="1")
    from tests.parallel.dist_utils import run_distributed

    tolerance = 1e-4 if args.cpu else 1e-2  # the test's
    names = args.only or [s.name for s in SETTINGS if args.all or s.name in QUICK]
    run_distributed(worker, 2, device, names, args.seeds, tolerance, args.cpu_kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
