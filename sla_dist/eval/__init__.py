"""Evaluation of trained checkpoints (``sla-dist eval``).

    sampling.py     flow-matching ODE sampler (Euler, Heun) with classifier-free guidance and per-video seeds
    checkpoints.py  VideoDiT from a recipe + checkpoint (ZeRO directory, Lightning file, exported safetensors)
    flow_loss.py    validation flow-matching loss on held-out data
    fvd.py          FVD through torchmetrics' FID machinery: I3D TorchScript or random 3D-conv features
    clip.py         per-frame CLIP score through torchmetrics' CLIPScore from a local CLIP directory
    fidelity.py     per-layer SLA vs dense attention error on captured q, k, v
    videos.py       mp4 (PyAV), exact safetensors videos, PNG frame grids
    report.py       report.json, report.md, fidelity plot
    evaluate.py     the side-by-side evaluation of several checkpoints
    command.py      the ``eval`` subcommand

Submodules are imported explicitly: this package pulls in nothing heavy by itself.
"""
