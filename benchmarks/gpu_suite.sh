#!/usr/bin/env bash
# One device call, several parts: each runs under its own time limit, logs to $OUT/<part>.log, and the summary
# table comes last.   Usage: bash benchmarks/gpu_suite.sh PART[:SECONDS] ...
# Parts: kernels (full GPU grid, fixed launch settings, one pytest worker per 2 CPU cores spread over the GPUs),
# tuned (long-sequence tests with autotuning on), parallel (NCCL tests), sp-bench, models (GPU model tests),
# dit-bench, attn-bench (the old partial sweep), attn-quick (headline shape only; both time the compiled full layer
# too, two ~10 s compiles per shape: ~+180 s and ~+80 s, --only leaves it out), profile, host (host_overhead.py),
# host-ab (the layer's host time per eager call, this tree against the sla_dist under $BASE, default .land, e.g.
# `git archive main sla_dist | tar -x -C .land` carried along, in alternating processes; ~1 min),
# ncu (Nsight Compute's stall sampling of the forward, dQ and dK/dV kernels at L 32768: where their warps wait,
# benchmarks/ncu_stalls.py; ~40 s), sweep (every kernel's launch-setting candidates and the first call's tuning
# time), ops (the op-level GPU tests, fixed launch settings), memory (peak extra memory of a fwd+bwd: dense cuDNN vs
# the SLA layer, eager and compiled, at the sweep's four lengths, D 128; ~2 min), memory-d64 (the same at D 64),
# e2e (2 GPUs: the wan1.3b recipe through launch/torchrun.sh at SP = 1 and SP = 2 with activation checkpointing,
#   resumed, exported; step time, tokens/s, peak memory; give it e2e:500, its phases' limits add up to 470 s),
# train-profile (2 GPUs: bench_train.py --profile on the wan1.3b recipe as e2e runs it, SP = 1 then 2, 8 steps, steps
#   3 and 4 under torch.profiler, 5-7 timed; per-rank step breakdown tables + JSON, rank 0's traces; train-profile:420),
# train-compiled (2 GPUs: bench_train.py on the same recipe with model.compile=true, SP = 1 then 2, 10 steps, the
#   last 6 timed: the eager step's elementwise work fused; compare with train-throughput, the same run eager;
#   train-compiled:480), train-throughput (the eager baseline of train-compiled, same steps), train-overlap (SP = 2
#   eager with the Ulysses exchange in 2 head chunks and DeepSpeed's overlapped ZeRO reduction, against
#   train-throughput's SP = 2 row: what hides train-profile's exposed exchange), train-overlap-compiled (SP = 2
#   compiled with the overlapped ZeRO reduction; compiled blocks trace the exchange whole, so no head chunks),
# train-buckets (train-overlap-compiled with ZeRO's reduction in buckets of BUCKET gradient elements, default 5e7:
#   DeepSpeed's 5e8 makes fewer than three buckets of the 1.3B model, so most of the reduction waits for the backward's
#   end; train-buckets:300),
# ranks (2 GPUs: the multi-rank reliability tests on NCCL, independent spawned ranks: a rank that raises ends the
#   job through the collective timeout, rank 0's resume choice shared, the recipe timeout on every group; ranks:500),
# fwdloop (the forward loop variants of SLA_DIST_FWD_LOOP, one after the other: the layer at 32K and 8K, autotuned),
# fwdloop-kernel (the forward kernel's CUDA time per variant, with and without the linear epilogue),
# fwdloop-tests (the kernel grid on today's loop without the variants, SLA_DIST_FWD_LOOP=baseline: the default
# picks variants per head dim; test_fwd_loop.py runs each variant alone),
# inmodel-* (why SLA is slower inside bench_dit_step's model than alone, one factor at a time, PERF_NOTES): -layout
#   (i.i.d. inputs at 32768 / 32760 tokens, bhld / blhd / fused layouts), -inputs (at the model's 32760 tokens and
#   fused layout: i.i.d., field and the model's own q / k), -profile (per-kernel: i.i.d. vs the model's block map),
#   -neg (negligible 0 vs the default 0.10 of -layout), -maps (the model's block-map balance at its last layer, 29;
#   layer 0 measured on the CPU). Fixed launch settings (the sweep winners): no tuning, each part under 2 minutes.
# dkdv-order (the dK/dV kernel's CUDA time per SLA_DIST_DKDV_ORDER on i.i.d. and skewed maps, fixed launch settings),
# dkdv-order-tests (the kernel grid with dK/dV in the lpt order; test_dkdv_order.py compares every order with natural).
# classify (SLA_DIST_CLASSIFY: the layer at 32768, 75600 and 8192 tokens with the block map's classify kernel on its
#   separate then its packed radix selects, each with the kernels' CUDA time, glue kernels included; fixed launch
#   settings, ~3 min), classify-tests (the block-map kernel tests with both selects and the layer on the packed
#   one, eager and compiled; fixed launch settings, ~2 min).
# dkdv-split (the dK/dV kernel's CUDA time with long lists split, SLA_DIST_DKDV_SPLIT=long, beside the whole-list
#   orders, at L 32768 D 128 on i.i.d. and skewed synthetic maps and on the 1.3B DiT's layer-0 q, k at 32760; fixed
#   launch settings; "split us" is the plan and combine kernels; ~2 min), dkdv-split-b (the regime with more long
#   lists than SMs: 5 % hot key blocks drawn by every query block, L 32768 and 75600; ~1.5 min), dkdv-split-tests
#   (test_dkdv_split.py's GPU tests: bf16 / fp16 at D 64 / 128 against float64, CUDA-graph replay; with the order,
#   compile and CUDA-graph tests; ~2 min).
# tma (SLA_DIST_TMA: the layer at 32768 tokens, i.i.d. inputs in the bhld and the DiT's fused layout, the kernels'
#   loop tiles loaded by pointers (off) then through tensor descriptors (all), with each sparse-branch kernel's CUDA
#   time (each kernel's descriptors are independent of the others', so 'all' gives every kernel's effect at once);
#   fixed launch settings, ~2 min), tma-tests (the kernel grid with SLA_DIST_TMA=all; test_tma.py compares the
#   descriptor and pointer paths launch by launch and checks the misaligned layouts' fallback).
# 4 GPUs (issue #16; each part sized for one 10-minute device call beside the wheel install, limits stated):
# ranks4 (the 4-rank NCCL tests of tests/parallel, the four *_four_ranks tests that skip on 2 GPUs, repeated 10 times
#   by repeat_runs.py, each repeat under 180 s (the tests' collective timeout is 120 s): passes, fails and hangs
#   counted in $OUT/<date>-<card>x4-ranks4.json. Assumed ~60-70 s a repeat (2 spawned 2-rank tests of
#   test_ulysses.py took 33-62 s a run), mostly process start-up with the GPUs idle, so 2 repeats run at a time
#   (each rank r of both on GPU r, separate NCCL communicators); ranks4:530, budget 510 s: repeats the budget leaves
#   no room for are counted 'not run' (rerun the part for the rest; --jobs 1 in CMD for one at a time),
# ulysses4 (bench_sequence_parallel.py at P = 1, 2, 4, L 131072, H 12 and 24, Ulysses with the fused exchange
#   pipelined in 1, 2 and 3 head chunks (SequenceParallelConfig.overlap_chunks: 2 chunks gave 90 % at P = 2,
#   2026-11-30-h200x2-ulysses-overlap.md), both input layouts, 10 iterations, fixed launch settings; counts that do
#   not divide the heads per rank are skipped (H 12 at P 4: 3 heads, chunks 1 and 3); ~2-3 min; ulysses4:240),
# wan14b-sp4 (e2e_train.py --preset wan14b-sp4: recipes/wan14b_sla_sp8.yaml at full width with 4 of its 40 blocks,
#   SP = 4, ZeRO-3, activation checkpointing, 6 steps saving every 3, resumed for 3, exported; the preset says why
#   the depth is cut (a full-depth checkpoint is 200 GB). Memory per GPU from scaling_model.py, allocated / with
#   the 10.5 GiB nvidia-smi counted beyond it on the 1.3B: 4 blocks 14.3 / 24.8 GiB; full depth 73.8 / 84.3 GiB
#   (bf16 shard + fp32 gradient, master, m, v over 4 ranks 61.2, activations 11.7, bucket 0.9): fits 141 GB.
#   Predicted ~0.9 s a step. If the resume fails, the export takes the first run's checkpoint (ZeRO-3 resume
#   passes on CPU since 5da8716: test_cpu_flow_zero3_resume). Limits add up to 460 s; wan14b-sp4:520),
# zero3-sp2dp2 (e2e_train.py --preset wan14b-sp2dp2: the same model at SP = 2 x DP = 2, ZeRO-3 over the 4 ranks,
#   4 steps, one save at the end; 19.5 / 30.0 GiB per GPU predicted (full depth 85.5 / 96.0), ~1.5 s a step;
#   zero3-sp2dp2:280).
# scaling_report.py (scaling_four_gpu.py) compares the model with the JSON of ulysses4, wan14b-sp4 and zero3-sp2dp2
# once copied to benchmarks/results/.
# vstrides (the layer at the model's 32760 tokens, i.i.d. and the model's q / k, bhld vs fused layout: with v read in
#   its own strides the fused layout no longer copies v in the forward and the backward; bhld, which never copied, is
#   the control. Time a main checkout beside it: PYTHONPATH=/tmp/main python3 benchmarks/time_layer.py main ...).
# linsums (SLAConfig.linear_sums: the layer at 32K and 8K with the backward reading the forward's linear sums
#   (save) or making them again (recompute); fixed launch settings, ~1 min), linsums-memory (memory_layer.py's
#   dense and SLA rows at 32K, the layer once per linear_sums: peak extra and held MiB; ~1 min).
# compiled-memory (memory_layer.py --compiled: dense cuDNN, the eager layer and the layer through torch.compile
#   fullgraph at 8K and 32K, peak extra MiB and fwd+bwd ms; ~2 min with the compiles), compiled-tests (the compiled
#   path's and the backward's frees' tests on the GPU; ~2 min).
# attn-sweep-a, -b, -c, -d (issue #11's full grid, bench_attention.py --sweep --profile-glue, one H200 each, 8 cells
#   a part: a = L 8192 and 16384 at D 64, b = the same at D 128, c = L 32768 and 75600 at D 64, d = the same at
#   D 128; fixed launch settings. Each cell measures the full layer eager and compiled (torch.compile fullgraph,
#   an inference and a training graph per cell, assumed 10 s each: 160 s a part). Estimated a 229 s, b 229 s,
#   c 257 s, d 250 s (bench_attention.py --sweep --plan, calibrated on the 2026-11-30 sweep, whose two 16-cell halves
#   took 59 and 102 s without the compiled row); --budget 510 stops before a cell that would not fit (later cells'
#   estimates scaled by the worst overrun so far) and the JSON is rewritten after every cell: attn-sweep-a:560,
#   attn-sweep-b:560, attn-sweep-c:560, attn-sweep-d:560, one per GPU at once on a 4-GPU machine (or one per call).
#   Left cells: copy the JSON into the tree and rerun with SWEEP_APPEND=<that path>.
#   Report: python benchmarks/attention_report.py attn_sweep_{a,b,c,d}.json --before <old json>.
#   Autotuned: SWEEP_AUTOTUNE=1, the same parts (tuning is per head dim and branch, and the tuning cache does not
#   outlive the machine, so each part tunes its one D), 389, 389, 457 and 450 s by --plan),
# attn-graphs-a, -b, -c, -d (the attn-sweep parts' cells and rows with --graphs: FlexAttention and the full layer also
#   captured in CUDA graphs per cell, replayed by the timer, the report's "graphed" mode; fixed launch settings only:
#   autotuned, c and d would not fit one call by --plan). Estimated a 252 s, b 252 s, c 292 s, d 282 s (captures
#   assumed 0.5 s each, 4 a cell): attn-graphs-a:560, attn-graphs-b:560, attn-graphs-c:560, attn-graphs-d:560.
#   Report: python benchmarks/attention_report.py attn_graphs_{a,b,c,d}.json (a and b alone: the short sequences),
# block-sums (the block map's block sums of q and k per warp count, bench_block_sums.py; ~20 s), glue-warps (the
#   layer at 32768 and 8192 tokens under other warp counts for the glue kernels, one at a time: block sums,
#   summaries, classify, each with the kernels' CUDA time; fixed launch settings otherwise, ~2 min),
# dkdv-steps (the layer at 32768 and 75600 tokens with dK/dV's default launch, two 64-row loop steps per query block
#   on 4 warps x 2 stages (Q_STEPS=2: two programs per SM), beside the 8-warp one-step launch it replaced and other
#   warps x stages; with --kernels, each kernel's CUDA time; fixed launch settings, ~2 min),
# dq-split (the layer at 32768, 75600 and 8192 tokens with dQ's query blocks taken by one 8-warp program, then by two
#   4-warp programs over their row halves (SLA_DIST_DQ_SPLIT=halves: two per SM), each under its fixed launch setting
#   and with the split's 3 stages; --kernels: each kernel's CUDA time; ~2 min), dq-split-tests (test_dq_split.py and
#   the descriptor and compile tests with the split on; ~1 min),
# gelu-mlp (the DiT MLP's GELU backward pass: torch.compile's against the fused kernel per launch, then the MLP's
#   fwd+bwd eager and compiled, module calls vs fused; ~1 min),
# dit-mlp, dit-mlp-modules (the compiled 1.3B reference DiT's training step, dense and SLA, with the MLP's GELU
#   backward fused, the default since 2026-12-02, and with the module calls: what the fused pass does to the step and
#   to the ratio; two compiled models each, dit-mlp:400 dit-mlp-modules:400),
# deepspeed and omegaconf are not on the GPU machines: run ../shared/tools/device-wheels here, carry .whl, and start
# the device command with the install line it prints, e.g. (2 GPUs, about 6 minutes):
#   <install line> bash benchmarks/gpu_suite.sh e2e:500
set -u
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
workers=$(( $(nproc) / 2 > 16 ? 16 : $(nproc) / 2 ))
# bench_dit_step.py's model as locality_inputs' 'dit' source: its token grid, raster order, random init, i.i.d. video
# The 4-GPU parts' results are named for the date, the card and the GPU count (2026-12-01-h200x4-ulysses4.json):
# copied as they are to benchmarks/results/, scaling_report.py finds them.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/^NVIDIA //; s/ /-/g' | tr 'A-Z' 'a-z')
STEM=$OUT/$(date -u +%F)-${card:-cpu}x$gpus
MODEL_QK="--grid 21,30,52 --tile 1,1,1 --dit-model wan2.1-1.3b --qk-init independent --latents gaussian"
declare -A CMD=(
  [kernels]="env SLA_DIST_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels tests/test_attention.py"
  [tuned]="python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py -k long_sequences"
  [parallel]="python3 -m pytest -q -p no:cacheprovider -m gpu tests/parallel"
  [sp-bench]="python3 benchmarks/bench_sequence_parallel.py --out $OUT/sequence_parallel"
  [models]="python3 -m pytest -q -p no:cacheprovider -m gpu tests/models"
  [dit-bench]="python3 benchmarks/bench_dit_step.py"
  [block-sums]="python3 benchmarks/bench_block_sums.py --warps 1 2 4 --json $OUT/block_sums.json"
  [glue-warps]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py glue-warps --L 32768 8192 --kernels --setting default block_sums=4x1 block_sums=2x1 summaries=8x1 classify=2x1 classify=1x1"
  [dkdv-steps]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py dkdv-steps --L 32768 75600 --kernels --setting default dkdv=8x2/Q_STEPS=1 dkdv=4x2/Q_STEPS=2/KEYS_AS_COLUMNS=0 dkdv=4x3/Q_STEPS=2 dkdv=8x3/Q_STEPS=2"
  [dq-split]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py dq-split --L 32768 75600 8192 --kernels --dq-split off halves --setting default dq_split=4x3"
  [dq-split-tests]="env SLA_DIST_AUTOTUNE=0 SLA_DIST_DQ_SPLIT=halves python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels/test_dq_split.py tests/kernels/test_tma.py tests/kernels/test_compile.py tests/kernels/test_cuda_graphs.py tests/kernels/test_kernels.py"
  [gelu-mlp]="python3 benchmarks/bench_gelu_mlp.py --json $OUT/bench_gelu_mlp.json"
  [dit-mlp]="python3 benchmarks/bench_dit_step.py --models reference --variants dense sla --compile --no-checkpoint --out $OUT/dit_mlp_fused"
  [dit-mlp-modules]="python3 benchmarks/bench_dit_step.py --models reference --variants dense sla --compile --no-checkpoint --mlp modules --out $OUT/dit_mlp_modules"
  [attn-bench]="python3 benchmarks/bench_attention.py --json $OUT/bench_attention.json"
  [attn-quick]="python3 benchmarks/bench_attention.py --quick --json $OUT/bench_attention_quick.json"
  [attn-sweep-a]="env SLA_DIST_AUTOTUNE=${SWEEP_AUTOTUNE:-0} python3 benchmarks/bench_attention.py --sweep --profile-glue --budget 510 --cells ${SWEEP_CELLS:-L=8192,16384 D=64} --json $OUT/attn_sweep_a.json ${SWEEP_APPEND:+--append $SWEEP_APPEND}"
  [attn-sweep-b]="env SLA_DIST_AUTOTUNE=${SWEEP_AUTOTUNE:-0} python3 benchmarks/bench_attention.py --sweep --profile-glue --budget 510 --cells ${SWEEP_CELLS:-L=8192,16384 D=128} --json $OUT/attn_sweep_b.json ${SWEEP_APPEND:+--append $SWEEP_APPEND}"
  [attn-sweep-c]="env SLA_DIST_AUTOTUNE=${SWEEP_AUTOTUNE:-0} python3 benchmarks/bench_attention.py --sweep --profile-glue --budget 510 --cells ${SWEEP_CELLS:-L=32768,75600 D=64} --json $OUT/attn_sweep_c.json ${SWEEP_APPEND:+--append $SWEEP_APPEND}"
  [attn-sweep-d]="env SLA_DIST_AUTOTUNE=${SWEEP_AUTOTUNE:-0} python3 benchmarks/bench_attention.py --sweep --profile-glue --budget 510 --cells ${SWEEP_CELLS:-L=32768,75600 D=128} --json $OUT/attn_sweep_d.json ${SWEEP_APPEND:+--append $SWEEP_APPEND}"
  [attn-graphs-a]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/bench_attention.py --sweep --graphs --profile-glue --budget 510 --cells ${SWEEP_CELLS:-L=8192,16384 D=64} --json $OUT/attn_graphs_a.json ${SWEEP_APPEND:+--append $SWEEP_APPEND}"
  [attn-graphs-b]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/bench_attention.py --sweep --graphs --profile-glue --budget 510 --cells ${SWEEP_CELLS:-L=8192,16384 D=128} --json $OUT/attn_graphs_b.json ${SWEEP_APPEND:+--append $SWEEP_APPEND}"
  [attn-graphs-c]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/bench_attention.py --sweep --graphs --profile-glue --budget 510 --cells ${SWEEP_CELLS:-L=32768,75600 D=64} --json $OUT/attn_graphs_c.json ${SWEEP_APPEND:+--append $SWEEP_APPEND}"
  [attn-graphs-d]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/bench_attention.py --sweep --graphs --profile-glue --budget 510 --cells ${SWEEP_CELLS:-L=32768,75600 D=128} --json $OUT/attn_graphs_d.json ${SWEEP_APPEND:+--append $SWEEP_APPEND}"
  [profile]="python3 benchmarks/profile_sla.py --L 32768 8192 --host 25"
  [ncu]="python3 benchmarks/ncu_stalls.py --profile $OUT/ncu --top 12"
  [host]="python3 benchmarks/host_overhead.py --L 1024"
  [host-ab]="python3 benchmarks/host_overhead.py --L 2048 --n 40 --repeats 7 --against ${BASE:-.land}"
  [sweep]="python3 benchmarks/sweep_kernels.py --json $OUT/sweep_kernels.json"
  [memory]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/memory_layer.py --lengths 8192 16384 32768 75600 --compiled --out $OUT/memory_layer.json"
  [memory-d64]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/memory_layer.py --D 64 --lengths 8192 16384 32768 75600 --compiled --out $OUT/memory_layer_d64.json"
  [ops]="env SLA_DIST_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels/test_op.py tests/test_attention.py tests/kernels/test_block_select.py tests/kernels/test_block_map.py"
  [e2e]="python3 benchmarks/e2e_train.py --out $OUT/e2e_train"
  [fwdloop]="python3 benchmarks/time_layer.py fwdloop --fwd-loop baseline fma split+fma split+even+fma"
  [fwdloop-kernel]="python3 benchmarks/time_fwd_kernel.py"
  [fwdloop-tests]="env SLA_DIST_AUTOTUNE=0 SLA_DIST_FWD_LOOP=baseline python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels tests/test_attention.py"
  [train-compiled]="python3 benchmarks/bench_train.py --sizes 1 2 --steps 10 --warmup 4 --out $OUT/train_compiled.json sparsity.dense_steps=0 sparsity.anneal_steps=0 model.checkpoint_blocks=true model.compile=true"
  [train-overlap]="python3 benchmarks/bench_train.py --sizes 2 --steps 10 --warmup 4 --out $OUT/train_overlap.json sparsity.dense_steps=0 sparsity.anneal_steps=0 model.checkpoint_blocks=true parallel.overlap_chunks=2 parallel.overlap_comm=true"
  [train-overlap-compiled]="python3 benchmarks/bench_train.py --sizes 2 --steps 10 --warmup 4 --out $OUT/train_overlap_compiled.json sparsity.dense_steps=0 sparsity.anneal_steps=0 model.checkpoint_blocks=true model.compile=true parallel.overlap_comm=true"
  [train-buckets]="python3 benchmarks/bench_train.py --sizes 2 --steps 10 --warmup 4 --out $OUT/train_buckets.json sparsity.dense_steps=0 sparsity.anneal_steps=0 model.checkpoint_blocks=true model.compile=true parallel.overlap_comm=true parallel.reduce_bucket_size=${BUCKET:-50000000}"
  [train-throughput]="python3 benchmarks/bench_train.py --sizes 1 2 --steps 10 --warmup 4 --out $OUT/train_throughput.json sparsity.dense_steps=0 sparsity.anneal_steps=0 model.checkpoint_blocks=true"
  [train-profile]="python3 benchmarks/bench_train.py --sizes 1 2 --steps 8 --warmup 3 --profile --profile-steps 2 --out $OUT/train_profile.json sparsity.dense_steps=0 sparsity.anneal_steps=0 model.checkpoint_blocks=true"
  [dkdv-order]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_bwd_kernel.py"
  [tma]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py tma --L 32768 --layout bhld fused --tma off all --kernels"
  [tma-tests]="env SLA_DIST_AUTOTUNE=0 SLA_DIST_TMA=all python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels tests/test_attention.py"
  [classify]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py classify --L 32768 75600 8192 --classify separate packed --kernels"
  [classify-tests]="env SLA_DIST_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels/test_block_select.py tests/kernels/test_classify_select.py tests/kernels/test_switches.py tests/kernels/test_compile.py"
  [dkdv-split]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_bwd_kernel.py --L 32768 --D 128 --attracted 0 0.3 1 --inputs synthetic dit --orders natural long-first lpt-head split:long-first split:lpt-head split:natural $MODEL_QK"
  [dkdv-split-b]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_bwd_kernel.py --L 32768 75600 --D 128 --hot 0.05 --attracted 1 --orders natural long-first lpt-head split:long-first split:lpt-head"
  [dkdv-split-tests]="env SLA_DIST_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels/test_dkdv_split.py tests/kernels/test_dkdv_order.py tests/kernels/test_compile.py tests/kernels/test_cuda_graphs.py tests/kernels/test_compile_hopper.py::test_split_dkdv_compiles_like_the_whole_list_kernel"
  [dkdv-order-tests]="env SLA_DIST_AUTOTUNE=0 SLA_DIST_DKDV_ORDER=lpt python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels tests/test_attention.py"
  [inmodel-layout]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py iid --L 32768 32760 --layout bhld blhd fused"
  [inmodel-inputs]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py model --inputs iid field dit --layout bhld fused $MODEL_QK"
  [inmodel-profile]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/profile_sla.py --inputs iid dit --layout fused --rows 12 $MODEL_QK"
  [inmodel-neg]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py neg0 --L 32768 --negligible 0"
  [inmodel-maps]="python3 benchmarks/block_map_stats.py --device cuda --inputs iid dit --dit-layer 29 $MODEL_QK"
  [ranks4]="python3 benchmarks/repeat_runs.py --repeats 10 --jobs 2 --timeout 180 --budget 510 --require-passed 4 --out $STEM-ranks4 -- env SLA_DIST_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m gpu -k four_ranks tests/parallel"
  [ulysses4]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/bench_sequence_parallel.py --sizes 1 2 4 --modes ulysses --heads 12 24 --input-layout bhld blhd --overlap-chunks 1 2 3 --iters 10 --out $STEM-ulysses4"
  [wan14b-sp4]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/e2e_train.py --preset wan14b-sp4 --out $STEM-wan14b-sp4"
  [zero3-sp2dp2]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/e2e_train.py --preset wan14b-sp2dp2 --out $STEM-zero3-sp2dp2"
  [linsums]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py linsums --linear-sums save recompute"
  [linsums-memory]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/memory_layer.py --lengths 32768 --linear-sums save recompute --out $OUT/memory_linsums.json"
  [compiled-memory]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/memory_layer.py --lengths 8192 32768 --compiled --out $OUT/memory_compiled.json"
  [compiled-tests]="env SLA_DIST_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n $workers tests/kernels/test_compile.py tests/kernels/test_release.py tests/kernels/test_linear_sums.py tests/kernels/test_dkdv_chunks.py tests/kernels/test_op.py tests/kernels/test_cuda_graphs.py"
  [vstrides]="env SLA_DIST_AUTOTUNE=0 python3 benchmarks/time_layer.py vstrides --inputs iid dit --layout bhld fused $MODEL_QK"
  [ranks]="env SLA_DIST_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m gpu tests/lightning/test_rank_failure.py tests/lightning/test_shared_resume.py tests/lightning/test_strategy.py"
)
summary=()
for spec in "$@"; do
  part=${spec%%:*}; limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
  start=$(date +%s)
  timeout "$limit" ${CMD[$part]} > "$OUT/$part.log" 2>&1; rc=$?
  summary+=("$(printf '%-11s rc=%-3s %4ss  %s' "$part" "$rc" "$(( $(date +%s) - start ))" \
    "$(grep -E 'passed|failed|error' "$OUT/$part.log" | tail -1 | cut -c1-90)")")
done
for part in "$@"; do tail -n 25 "$OUT/${part%%:*}.log" | grep -vE '^\s*$' | tail -n 12; done
printf '%s\n' "${summary[@]}"
