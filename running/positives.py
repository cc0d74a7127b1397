"""Positives that keep the source (train.py --positive_weight): a recording and the same event at another station.

An event archive keeps each event's recordings in a folder of its own (exotic_events/waveforms/<event>/): the same
source seen through other paths and instruments, known without a label of its kind. With --positive_weight W > 0
the training batches are made of pairs of samples of one folder (PairSampler), and the loss gains W times a
supervised-contrastive term (Khosla et al. 2020; SimCLR's NT-Xent where each anchor has one positive) on what the
read-out reads: the time mean and standard deviation of the latent's rows below READOUT_MAX_HZ. It pulls the
recordings of one event together and pushes the other events of the batch away; the reconstruction keeps what the
spectrogram holds. A folder of one recording pairs it with itself (its two copies differ by their augmentation).
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

TEMPERATURE = 0.1  # of the cosine similarities (SimCLR's range: 0.1 to 0.5)


def folder_codes(paths):
    """(N,) integer code of each path's folder: samples of one code are positives of each other."""
    return np.unique([os.path.dirname(str(path)) for path in paths], return_inverse=True)[1]


class PairSampler(Sampler):
    """Positions 0..N-1 of the training samples in pairs of one folder code, the pairs in a random order per epoch:
    batches of an even size hold whole pairs. Each sample appears once an epoch; a folder with an odd count adds one
    of its samples again. Under torchrun each process takes every num_replicas-th pair (the list repeated at its end
    to divide evenly), as DistributedSampler does with samples."""

    def __init__(self, codes, num_replicas=1, rank=0, seed=0):
        codes = np.asarray(codes, dtype=np.int64)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        counts = np.bincount(codes) if len(codes) else np.zeros(0, dtype=np.int64)
        # Each folder's positions, ascending, found once: one sort, not a scan of every sample per folder and epoch.
        members = np.split(np.argsort(codes, kind="stable"), np.cumsum(counts)[:-1])
        self.folders = [positions for positions in members if len(positions)]
        self.num_pairs = -(-int(sum(-(-counts // 2))) // num_replicas)  # this process's pairs

    def set_epoch(self, epoch):
        self.epoch = epoch

    def pairs(self):
        """(num_pairs, 2) positions of this process's pairs this epoch."""
        rng = np.random.default_rng((self.seed, self.epoch))
        pairs = []
        for positions in self.folders:
            members = rng.permutation(positions)
            if len(members) % 2:
                members = np.append(members, rng.choice(members[:-1]) if len(members) > 1 else members[0])
            pairs.append(members.reshape(-1, 2))
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=int)
        pairs = pairs[rng.permutation(len(pairs))]
        total = self.num_pairs * self.num_replicas
        pairs = np.concatenate([pairs] * -(-total // max(1, len(pairs))))[:total] if len(pairs) else pairs
        return pairs[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self.pairs().flatten().tolist())

    def __len__(self):
        return 2 * self.num_pairs


def band_summary(latent, mask, rows, stride):
    """(B, C, F', T') latent of a padded batch with its (B, T) input mask -> (B, 2 * C * rows): the mean and the
    standard deviation over each sample's valid latent time bins of its first `rows` frequency rows (the read-out's
    time-mean-std of its band, embedding/readout.py)."""
    band = latent[:, :, :rows].float()
    n_valid = (mask.sum(dim=1) + stride - 1) // stride  # latent bins that see a valid input bin
    weights = (torch.arange(band.shape[3], device=band.device)[None] < n_valid[:, None]).to(band.dtype)
    weights = (weights / weights.sum(dim=1, keepdim=True))[:, None, None, :]  # (B, 1, 1, T')
    mean = (band * weights).sum(dim=3, keepdim=True)
    std = (((band - mean) ** 2 * weights).sum(dim=3) + 1e-8).sqrt()
    return torch.cat([mean.squeeze(3), std], dim=2).flatten(1)


def contrastive_loss(features, codes, temperature=TEMPERATURE):
    """Supervised-contrastive loss of (B, D) features whose (B,) codes say which rows are positives of each other:
    the mean over anchors with a positive of -log(softmax over the other rows) at their positives. Features are
    centred over the batch and scaled to unit length first (the latent is non-negative: uncentred, all rows point
    alike). 0 (joining the graph) when no row has a positive."""
    z = F.normalize(features - features.mean(dim=0, keepdim=True), dim=1)
    similarity = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = similarity.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    positive = (codes[:, None] == codes[None, :]) & ~eye
    anchors = positive.any(dim=1)
    if not anchors.any():
        return features.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1).clamp(min=1))
    return per_anchor[anchors].mean()


@dataclass(frozen=True)
class Positives:
    """The contrastive term of train.py --positive_weight: its weight, the latent rows it reads (readout.band_rows) and
    the model's stride (input bins per latent bin)."""

    weight: float
    rows: int
    stride: int

    def of_batch(self, metas):
        """(latent, mask) -> weight x contrastive_loss, the positives being the samples of one folder."""
        codes = torch.as_tensor(folder_codes([meta["path"] for meta in metas]))

        def loss(latent, mask):
            features = band_summary(latent, mask, self.rows, self.stride)
            return self.weight * contrastive_loss(features, codes.to(latent.device))

        return loss
