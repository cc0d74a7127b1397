"""torchrun helpers of the scripts: the process group, rank 0's values, sums over processes, DDP wrapping; and the
samples shared among processes, their results joined back in the order of one process.

embed.py and inference.py plan the order in which one process would read the samples (LengthBatchSampler: by
length, then by position), give process r of W the r-th contiguous share of that order, and rank 0 joins the
shares in rank order: the outputs are those of one process, whatever W is.

Without torchrun (no RANK in the environment) every helper is a no-op for a single process (one share: all of it).
"""

import logging
import os
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from reading.batching import LengthBatchSampler
from running.device import resolve_device
from running.settings import RunError

PREPARE_MINUTES = 60  # how long processes wait for rank 0 to index and cache the data (torchrun)


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


@contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (indexing, caching an archive); the others run it after and find its results
    stored. An error on rank 0 still releases the others, which then meet the same error."""
    if not is_rank_zero():
        dist.barrier()
    try:
        yield
    finally:
        if dist.is_initialized() and is_rank_zero():
            dist.barrier()


def run_script(parser, args, work):
    """work(args, device) in this process, alone or one of a torchrun job: rank 0 logs at INFO, the others errors only
    (rank 0 reports for all); a RunError or a missing file ends it in one line with exit code 2."""
    try:
        rank, _, device = init_distributed(args.device)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    level = logging.INFO if rank == 0 else logging.ERROR
    logging.basicConfig(level=level, force=True, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return work(args, device)
    except (FileNotFoundError, RunError) as err:
        parser.exit(2, f"error: {err}\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def planned_order(lengths, batch_size, positions):
    """(N,) int64 dataset positions in the order one process reads them: batches of one length, by length, then
    position."""
    batches = LengthBatchSampler(lengths, batch_size, positions).batches()
    return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)


def own_share(order):
    """This process's contiguous share of `order` (shares differ in size by at most one sample)."""
    rank, world_size = rank_and_world_size()
    return order[rank * len(order) // world_size : (rank + 1) * len(order) // world_size]


def gather_in_rank_order(value):
    """[value of rank 0, of rank 1, ...] on rank 0 (pickled through the process group), None on the others."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size() if is_rank_zero() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
