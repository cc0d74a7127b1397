"""Reconstructions that need no training, beside which every model figure is reported.

Both take a padded batch (B, 3, F, T) and its mask (B, T) of valid time bins and use valid bins only.
  time_mean  each recording's time-averaged spectrum repeated over time: a model that does not beat
             it has learned no more than each recording's average spectral shape;
  blur       each recording average-pooled by BLUR_FACTOR in frequency and time, then bilinear back to
             its size: a model that does not beat it reconstructs no finer detail than a coarse copy.
"""

import math

import torch
import torch.nn.functional as F

BLUR_FACTOR = 8  # bins pooled together along each axis


def time_mean(spectrogram, mask):
    """Each sample's time-averaged spectrum over its valid bins, repeated over time: (B, 3, F, T)."""
    weights = mask[:, None, None, :].to(spectrogram.dtype)
    mean_spectrum = (spectrogram * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True)
    return mean_spectrum.expand_as(spectrogram)


def blur(spectrogram, mask):
    """Each sample's valid bins average-pooled BLUR_FACTOR x BLUR_FACTOR, bilinear back: (B, 3, F, T), 0 on padding."""
    blurred = torch.zeros_like(spectrogram)
    for k, n_time in enumerate(mask.sum(dim=1).tolist()):
        valid = spectrogram[k : k + 1, :, :, :n_time]  # (1, 3, F, n_time)
        size = valid.shape[-2:]
        coarse = F.adaptive_avg_pool2d(valid, [math.ceil(n / BLUR_FACTOR) for n in size])
        blurred[k, :, :, :n_time] = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    return blurred


BASELINES = {"baseline": time_mean, "blur": blur}  # metrics.json keys; "baseline" is the time-mean one
