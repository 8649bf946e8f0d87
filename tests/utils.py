"""Facts every test module shares."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()


def _device() -> torch.device:
    """CPU, or one GPU per pytest-xdist worker (gw0, gw1, ...) spread over the visible GPUs."""
    if not HAS_CUDA:
        return torch.device("cpu")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) % torch.cuda.device_count() if worker[2:].isdigit() else 0
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


DEVICE = _device()
