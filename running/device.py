"""The machine a script runs on: the device, mixed precision, batches to the device, DataLoader options, versions."""

import platform
from contextlib import nullcontext
from functools import partial

import numpy as np
import obspy
import scipy
import torch

from running.checkpoints import load_checkpoint
from running.settings import RunError
from stft_dataset import pad_collate

PREFETCH_BATCHES = 4  # batches each DataLoader worker prepares ahead
AMP_MODES = ("off", "auto", "bf16", "fp16")  # --amp


def resolve_device(name):
    """--device of every script: 'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def device_and_checkpoint(device_name, path):
    """(device, checkpoint on it) for the scripts that start from a checkpoint; an unknown device or a foreign or
    damaged checkpoint is a RunError."""
    try:
        device = resolve_device(device_name)
        return device, load_checkpoint(path, device)
    except ValueError as err:
        raise RunError(str(err)) from None


def mixed_precision(amp, device):
    """--amp -> (autocast context factory, GradScaler, dtype name). Only fp16 needs the scaler."""
    if amp == "auto":
        amp = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    autocast = partial(torch.autocast, device.type, dtype=dtype) if dtype else nullcontext
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), amp


def model_input(spectrogram, device):
    """A batch's (B, 3, F, T) spectrograms as the model takes them: on the device, channels_last, float32.

    The cache's float16 is converted after the copy, so half the bytes cross to the GPU.
    """
    return spectrogram.to(device, non_blocking=True, memory_format=torch.channels_last).float()


def loader_options(batch_size, num_workers, device):
    """DataLoader settings of every loader of the scripts: workers kept up between epochs, each
    preparing PREFETCH_BATCHES ahead; pinned memory for fast, non-blocking copies to a GPU."""
    workers = {}
    if num_workers:
        workers = dict(num_workers=num_workers, persistent_workers=True, prefetch_factor=PREFETCH_BATCHES)
    return dict(batch_size=batch_size, collate_fn=pad_collate, pin_memory=device.type == "cuda", **workers)


def package_versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "obspy": obspy.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
    }
