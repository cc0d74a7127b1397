"""Augmentation of training batches (never of validation, inference or embedding batches).

random_time_crop: every sample of a batch becomes one window of the same random number of time bins,
at its own random start, and each component is min-max normalised again over that window, as a real
recording of that length would be (transform.spectrogram scales each component to [0, 1]; an affine
map of the log-magnitude, so scaling a window again gives exactly what the transform gives for it).
Draws come from a numpy Generator the caller seeds per batch (crop_rng), so a run resumed at any step repeats them.
"""

import numpy as np
import torch


def random_time_crop(spectrogram, mask, rng, min_bins, max_bins):
    """(B, 3, F, T) padded batch, (B, T) mask -> (B, 3, F, L) batch and its all-True (B, L) mask.

    L is drawn uniformly in [min_bins, max_bins], at most the shortest sample's valid length; each
    sample's window starts at a uniform position within its valid bins.
    """
    lengths = mask.sum(dim=1).tolist()
    longest = min(max_bins, min(lengths))
    n_bins = int(rng.integers(min(min_bins, longest), longest + 1))
    starts = [int(rng.integers(0, n_valid - n_bins + 1)) for n_valid in lengths]
    windows = torch.stack([x[:, :, start : start + n_bins] for x, start in zip(spectrogram.float(), starts)])
    return rescale(windows), torch.ones(len(starts), n_bins, dtype=torch.bool)


def rescale(windows):
    """Min-max to [0, 1] per sample and component over (freq, time); a constant component becomes zeros."""
    low = windows.amin(dim=(2, 3), keepdim=True)
    span = windows.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 0, (windows - low) / span.clamp_min(torch.finfo(windows.dtype).tiny), 0.0)


def crop_rng(seed, epoch, rank, step):
    """The crop draws of one batch (step of an epoch) of one process: the same in a run resumed at any step."""
    return np.random.default_rng([seed, epoch, rank, step])
