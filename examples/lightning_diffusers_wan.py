"""Bring your own LightningModule: SLA in a diffusers ``WanTransformer3DModel`` through SLACallback and SLAStrategy.

Nothing here is sla-dist's training recipe: the LightningModule, its loss and its Trainer are the user's own. Adding
SLA takes two lines of the Trainer:

    callbacks=[SLACallback(SLAConfig(topk=0.25), dense_steps=..., anneal_steps=...)]   # converts blocks.*.attn1
    strategy="sla_deepspeed_stage_2"                                                    # DeepSpeed ZeRO-2

A randomly initialised two-layer Wan (dim 64) learns the built-in synthetic moving-shape videos on the CPU in about
a minute; rerunning the command resumes from ``OUT/checkpoints/last.ckpt``:

    python examples/lightning_diffusers_wan.py --out runs/example_wan                  # 30 steps
    python examples/lightning_diffusers_wan.py --out runs/example_wan --max-steps 60   # resumes at step 30

Two CPU processes (gloo) run data-parallel with ``--devices 2``, or sequence-parallel with ``--devices 2
--sequence-parallel 2``: ``strategy=SLAStrategy(stage=2, sequence_parallel_size=2)`` shards the Wan's token sequence
over the two ranks by hooks on the model (the module's forward and loss stay as they are), and every rank of an SP
group reads the same samples and must draw the same noise.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from sla_dist import SLAConfig
from sla_dist.lightning import SLACallback, SLAStrategy
from sla_dist.lightning.monitor import StepProgressBar, TrainingMonitor
from sla_dist.lightning.synthetic import SyntheticVideoDataset
from sla_dist.quiet import configure_output

LATENT_SHAPE = (4, 4, 16, 16)  # (C, T, H, W): 4 x 8 x 8 = 256 tokens after the (1, 2, 2) patch = 4 SLA blocks
TEXT_DIM, TEXT_LEN = 16, 8


def tiny_wan(seed: int = 0) -> WanTransformer3DModel:
    """A randomly initialised two-layer Wan2.1 transformer (head dim 32, the smallest the SLA kernels take)."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                 out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=128, num_layers=2,
                                 rope_max_seq_len=32)


class WanFlowMatching(pl.LightningModule):
    """A user's LightningModule: rectified-flow training of a diffusers Wan (velocity target noise - latents)."""

    def __init__(self, lr: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_wan(seed)  # SLACallback looks for the DiT under ``model`` (or pass attribute=...)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents, text = batch["latents"], batch["text"]
        # noise seeded by (seed, step, data-parallel rank): a resumed run draws what the uninterrupted one would
        # have, and the ranks sharing one sample's sequence (sequence parallelism) draw the same noise
        rank = self.trainer.strategy.distributed_sampler_kwargs["rank"]
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.hparams.seed},{self.global_step},{rank}".encode()))
        noise = torch.randn(latents.shape, generator=g).to(latents)
        sigma = torch.rand(latents.shape[0], generator=g).to(latents)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = self.model((1 - s) * latents + s * noise, sigma * 1000, text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), (noise - latents).float())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr)


def build_trainer(out: Path, max_steps: int, devices: int = 1, sequence_parallel: int = 1,
                  extra_callbacks: tuple = (), **trainer_kwargs) -> pl.Trainer:
    # optional extras: lr / grad norm / step time logging and a progress bar over steps that survives resumes
    monitor = TrainingMonitor()
    strategy = ("sla_deepspeed_stage_2" if sequence_parallel == 1
                else SLAStrategy(stage=2, sequence_parallel_size=sequence_parallel))
    return pl.Trainer(
        accelerator="cpu", devices=devices, max_steps=max_steps, strategy=strategy,
        callbacks=[SLACallback(SLAConfig(topk=0.25, negligible=0.25), dense_steps=5, anneal_steps=10),
                   ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=10, save_last=True),
                   monitor, StepProgressBar(monitor), *extra_callbacks],
        default_root_dir=out, log_every_n_steps=5, **trainer_kwargs)


def fit(out: Path, max_steps: int, devices: int = 1, sequence_parallel: int = 1, extra_callbacks: tuple = (),
        **trainer_kwargs) -> pl.Trainer:
    """Train (resuming from ``out/checkpoints/last.ckpt`` when it exists)."""
    pl.seed_everything(0, workers=True)
    data = SyntheticVideoDataset(256, *LATENT_SHAPE, text_dim=TEXT_DIM, text_len=TEXT_LEN, seed=0)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = build_trainer(out, max_steps, devices, sequence_parallel, extra_callbacks, **trainer_kwargs)
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(WanFlowMatching(), loader, ckpt_path=str(last) if last.exists() else None)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/example_wan"), help="checkpoints and logs go here")
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps in total (resumes count on)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (gloo)")
    parser.add_argument("--sequence-parallel", type=int, default=1,
                        help="processes sharing one sample's token sequence (divides --devices)")
    args = parser.parse_args()
    configure_output()  # hide DeepSpeed's and Lightning's chatter, as the sla-dist command does
    trainer = fit(args.out, args.max_steps, args.devices, args.sequence_parallel)
    if trainer.is_global_zero:
        print(f"step {trainer.global_step}: loss {float(trainer.callback_metrics['train/loss']):.4f}; "
              f"checkpoint {args.out / 'checkpoints' / 'last.ckpt'}")


if __name__ == "__main__":
    main()
