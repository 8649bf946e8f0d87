"""What conversion to SLA costs a pretrained study model before any fine-tuning, and what calibrating proj_l recovers.

Loads a quality-study checkpoint (``quality_study.py --phase pretrain`` writes one), and measures the validation
flow-matching loss on held-out clips (the study's own clips and noise) of:

* ``dense``: the pretrained model as it is;
* ``sparse_only``: every layer block-sparse at the study's sparsity (SLA with proj_l = 0 is the same);
* ``sla_calibrated``: SLA with proj_l fitted to the dense model's attention on ``--calibrate-clips`` training clips
  (``sla_dist.calibrate_projections``), with the per-layer attention errors before / after the fit;
* ``sla_calibrated_sequential`` (``--sequential``): the same fitted one layer at a time, each on the outputs of
  the already fitted layers before it.

The fine-tunes of the study start from these losses (its table's "fine-tune start" column). On CPU the SLA layers
run the PyTorch reference (a few minutes for the gpu preset's 9216-token clips with the defaults below):

    python benchmarks/quality/conversion_loss.py --resume-from .quality-ft --val-clips 4 --draws 1 --calibrate-clips 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sla_dist.eval.flow_loss import validation_loss  # noqa: E402
from sla_dist.lightning.synthetic import SCENES  # noqa: E402
from sla_dist.models import VideoDiT  # noqa: E402
from study_train import calibrate_sla, convert, load_study_model, study_clips  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume-from", type=Path, required=True, help="a quality-study checkpoint folder")
    parser.add_argument("--scene", choices=SCENES, help="the synthetic scene of the clips: the checkpoint's (the "
                        "default); another one is refused")
    parser.add_argument("--val-clips", type=int, default=4, help="held-out clips (the study uses 32)")
    parser.add_argument("--draws", type=int, default=1, help="noise levels per clip (the study uses 4)")
    parser.add_argument("--calibrate-clips", type=int, default=2, help="training clips proj_l is fitted on")
    parser.add_argument("--sparsity", type=float, help="block sparsity (default: the checkpoint's study's)")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per forward (the CPU reference SLA holds "
                        "a clip's [heads, L, L] scores: ~2 GiB per clip at the gpu preset's 9216 tokens)")
    parser.add_argument("--sequential", action="store_true", help="also calibrate layer by layer (one pass of the "
                        "calibration clips per layer) and measure that model")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    overrides = {} if args.sparsity is None else {"sparsity": args.sparsity}
    checkpoint, config, dit, dense = load_study_model(args.resume_from, scene=args.scene, **overrides)
    dense.to(device).eval()
    val = study_clips(config, dit, range(config.train_samples, config.train_samples + args.val_clips))
    train = tuple(t.to(device) for t in study_clips(config, dit, range(args.calibrate_clips)))
    val = tuple(t.to(device) for t in val)

    def loss(model: VideoDiT) -> float:
        t0 = time.monotonic()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value = validation_loss(model, *val, draws=args.draws, batch_size=args.batch_size)
        print(f"  {time.monotonic() - t0:.0f} s", flush=True)
        return value

    results = {"checkpoint": str(args.resume_from), "scene": config.scene,
               "pretrain_steps": checkpoint.meta["pretrain"]["steps"],
               "sparsity": config.sparsity, "val_clips": args.val_clips, "draws": args.draws,
               "calibrate_clips": args.calibrate_clips, "device": str(device)}
    results["dense"] = loss(dense)
    print(f"dense: {results['dense']:.4f}", flush=True)
    sparse = convert(copy.deepcopy(dense), "sla", config)  # proj_l = 0: the sparse branch alone
    results["sparse_only"] = loss(sparse)
    print(f"sparse-only (SLA, proj_l = 0): {results['sparse_only']:.4f}", flush=True)
    variants = {"sla_calibrated": ("calibration", False)}  # results key: (its calibration report's key, sequential)
    if args.sequential:
        variants["sla_calibrated_sequential"] = ("calibration_sequential", True)
    for key, (report, sequential) in variants.items():
        model = copy.deepcopy(sparse)
        calibration = calibrate_sla(model, *train, args.batch_size, sequential=sequential)
        results[report] = calibration
        results[key] = loss(model)
        print(f"{key} ({args.calibrate_clips} clips): mean attention error {calibration['sparse_error']:.4f} -> "
              f"{calibration['calibrated_error']:.4f}; validation loss {results[key]:.4f}", flush=True)
        print("\n| layer | attention error, proj_l = 0 | calibrated |\n|---|---|---|")
        for name, r in calibration["layers"].items():
            print(f"| {name} | {r['sparse_error']:.4f} | {r['calibrated_error']:.4f} |")
    print(f"\nvalidation flow loss ({config.scene} scene, {args.val_clips} clips x {args.draws} draws, sparsity "
          f"{config.sparsity}): dense "
          f"{results['dense']:.4f}, sparse-only {results['sparse_only']:.4f}, "
          + ", ".join(f"{key} {results[key]:.4f}" for key in variants))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
