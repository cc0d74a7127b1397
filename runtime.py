"""Run-time helpers every script shares: the argument parser, device, mixed precision, batches to the device, DataLoader
options, and the distributed (torchrun) helpers. Without torchrun the distributed helpers are no-ops."""

import argparse
import os
import platform
from contextlib import nullcontext
from datetime import timedelta
from functools import partial

import numpy as np
import obspy
import scipy
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from checkpoints import load_checkpoint
from recordings import window_problems
from stft_dataset import pad_collate

PREFETCH_BATCHES = 4  # batches each DataLoader worker prepares ahead
PREPARE_MINUTES = 60  # how long processes wait for rank 0 to index and cache the data (torchrun)


class RunError(Exception):
    """A problem the user must fix (bad data directory, unusable split, ...): scripts print it as one line, exit 2."""


def script_parser(doc):
    """An argparse parser described by the first line of the script's docstring; --help shows every default."""
    return argparse.ArgumentParser(
        description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def add_window_flags(parser, verb):
    """--window_seconds and --window_stride of a script that reads a run's data (inference.py, embed.py)."""
    parser.add_argument(
        "--window_seconds",
        type=float,
        help=f"{verb} windows of this many seconds (default: the checkpoint's; none there: one sample per file)",
    )
    parser.add_argument(
        "--window_stride",
        type=float,
        help="seconds between window starts (default: the checkpoint's, else --window_seconds)",
    )


def chosen_windows(args, settings):
    """(window_seconds, window_stride): the flags of add_window_flags, else the checkpoint's (data_settings); a new
    --window_seconds without --window_stride strides by its own length. RunError if they do not fit the STFT."""
    window_seconds = args.window_seconds or settings["window_seconds"]
    window_stride = args.window_stride or (settings["window_stride"] if not args.window_seconds else None)
    problems = window_problems(window_seconds, window_stride, settings["stft"])
    if problems:
        raise RunError("; ".join(problems))
    return window_seconds, window_stride


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


def init_distributed(device_name):
    """(rank, world size, device). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) this process
    joins the process group: NCCL with one GPU per process, gloo on CPU."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world_size, local_rank = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Long timeout: the other processes wait at a barrier while rank 0 indexes (and caches) a large archive.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=PREPARE_MINUTES))
    return rank, world_size, device


def rank_and_world_size():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_rank_zero():
    return not dist.is_initialized() or dist.get_rank() == 0


def from_rank_zero(value):
    """Rank 0's value on every process (e.g. the run name, which holds the time)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(values, device):
    """Sums over all processes of each value (floats or 0-d tensors), in one all-reduce."""
    sums = torch.stack([torch.as_tensor(value, dtype=torch.float64).to(device) for value in values])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums.tolist()


def gather_skips(skips):
    """Every process reads different files: each SkipLog gets the unusable files found by all of them."""
    if dist.is_initialized():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, [(path, *entry) for path, entry in skips.files.items()])
        for entries in found:
            skips.add_batch(entries)


def epoch_seed(seed, epoch, rank):
    """Independent seed per (run seed, epoch, process): resumed runs repeat it, processes never share it."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def wrap_for_training(model, compile_model, device):
    """(module to evaluate: compiled or not, module to train: that one wrapped in DDP under torchrun).

    Both share model's weights, so checkpoints always hold the plain model's state dict.
    """
    forward = torch.compile(model) if compile_model else model
    if not dist.is_initialized():
        return forward, forward
    return forward, DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)


def share_batchnorm_statistics(model):
    """Rank 0's BatchNorm running statistics to every process, so that all validate the model rank 0 saves.

    DDP copies them only at the start of the next training step; until then each process holds those
    of its own last batch.
    """
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
