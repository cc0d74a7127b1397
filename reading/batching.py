"""Batches of recordings of one length, so that a recording's reconstruction, metrics and embedding do not depend on
what else shares its batch.

A zero-padded batch changes every recording shorter than the longest: the padding reaches valid bins through the
convolutions' receptive field, and the decoder is interpolated to the padded length. Two pieces prevent that:
  LengthBatchSampler  a DataLoader batch_sampler that puts files of the same number of time bins together
                      (known from the headers before reading: SeismicSTFTDataset.time_bins), in a deterministic
                      order that depends on (seed, epoch) alone;
  length_groups       the positions of each valid length within a padded batch: the model runs on each group cut
                      to its own length, so an estimate that was off by a bin costs a smaller batch, never a
                      wrong answer.
"""

import numpy as np
import torch


class LengthBatchSampler:
    """Batches of at most `batch_size` dataset positions whose `lengths` are equal.

    Without shuffle: positions sorted by length, then by position. With shuffle: positions are permuted, grouped by
    length, and the batches permuted, both from numpy's Generator([seed, epoch]) (`set_epoch` as with
    DistributedSampler), so the order of an epoch is a function of (seed, epoch) and a resumed run can rebuild it.
    `positions` restricts the batches to those dataset positions (default: all).
    """

    def __init__(self, lengths, batch_size, positions=None, shuffle=False, seed=0):
        self.lengths = np.asarray(lengths)
        self.positions = np.arange(len(self.lengths)) if positions is None else np.asarray(positions, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def batches(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.positions) if self.shuffle else self.positions
        order = order[np.argsort(self.lengths[order], kind="stable")]
        breaks = np.flatnonzero(np.diff(self.lengths[order])) + 1  # where the length changes
        batches = [  # numpy arrays (views), not lists: an archive's millions of positions as Python ints take 36 B each
            run[start : start + self.batch_size]
            for run in np.split(order, breaks)
            for start in range(0, len(run), self.batch_size)
        ]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        return (batch.tolist() for batch in self.batches())

    def __len__(self):
        counts = np.unique(self.lengths[self.positions], return_counts=True)[1]
        return int(sum(-(-counts // self.batch_size)))


def length_groups(mask):
    """(B, T) mask of valid time bins -> [(n_time, positions tensor)] of the samples of each valid length."""
    lengths = mask.sum(dim=1)
    return [(int(n), torch.nonzero(lengths == n).flatten()) for n in torch.unique(lengths).tolist()]


def reconstruct(model, x, mask):
    """The model's reconstruction of a padded batch (B, 3, F, T), each sample computed at its own length:
    (B, 3, F, T), zero on padding."""
    reconstruction = torch.zeros_like(x)
    for n_time, rows in length_groups(mask):
        reconstruction[rows, :, :, :n_time] = model(x[rows, :, :, :n_time]).to(x.dtype)
    return reconstruction
