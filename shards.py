"""Samples shared among torchrun processes, and their results joined back in the order of one process.

embed.py and inference.py plan the order in which one process would read the samples (LengthBatchSampler: by
length, then by position), give process r of W the r-th contiguous share of that order, and rank 0 joins the
shares in rank order: the outputs are those of one process, whatever W is. Without torchrun every helper here is a
no-op (one share: all of it).
"""

import numpy as np
import torch.distributed as dist

from batching import LengthBatchSampler
from distributed import is_rank_zero, rank_and_world_size


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
