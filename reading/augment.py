"""Augmentation of training batches (never of validation, inference or embedding batches).

random_time_crop: every sample of a batch becomes one window of the same random number of time bins,
at its own random start, and each component is normalised again over that window, as a real
recording of that length would be (min-max: transform.spectrogram scales each component to [0, 1], an affine
map of the log-magnitude, so scaling a window again gives exactly what the transform gives for it; background-db:
each row is set over its median in the window again, the same up to the bins the transform clipped).
random_time_offset: a crop that drops 0 to MAX bins of the batch's shortest sample at a random place, so that a model
of stride 16 trains on every length modulo 16 (where the recording's end falls on its grid) with windows all but as
long as the recording (a short crop normalised again is another picture than the same stretch in a long window).
random_spectral_tilt: every sample gets a random instrument response |H(f)| = f ** p, the same on its three
components (p = 1: an accelerometer's record of a velocity sensor's ground motion), then is normalised again
(background-db undoes it but for clipped bins: each row is set over its own level).
random_noise_floor: every sample gets a random floor of incoherent noise (power added to each bin's power, as a noisier
site or instrument would add), the same on its three components, then is normalised again.
random_horizontal_swap: E and N exchange places in a random share of the samples: the magnitudes a station records
whose horizontal sensors are turned by 90 degrees (N' = E, E' = -N), exactly; nothing is normalised again.
Draws come from a numpy Generator the caller seeds per batch (batch_rng), so a run resumed at any step repeats them;
the crop (or offset) draws first, then the tilt, then the floor, then the swap, so a run without the later ones draws as
before they existed.
"""

import numpy as np
import torch

from reading.transform import BACKGROUND_DB, STFTConfig

NOMINAL_DECADES = 6.5  # log10 range of a component's |STFT| taken for the noise floor: the shipped files' median
DEFAULT = STFTConfig.normalisation  # the normalisation of a spectrogram when none is named
BACKGROUND_LEVEL = -BACKGROUND_DB[0] / (BACKGROUND_DB[1] - BACKGROUND_DB[0])  # background-db: where a row's median is


def decades(normalisation):
    """log10 units of |STFT| in one normalised unit: the nominal range of min-max, the fixed one of background-db."""
    return NOMINAL_DECADES if normalisation == "min-max" else (BACKGROUND_DB[1] - BACKGROUND_DB[0]) / 20.0


def random_time_crop(spectrogram, mask, rng, min_bins, max_bins, normalisation=DEFAULT):
    """(B, 3, F, T) padded batch, (B, T) mask -> (B, 3, F, L) batch and its all-True (B, L) mask.

    L is drawn uniformly in [min_bins, max_bins], at most the shortest sample's valid length; each
    sample's window starts at a uniform position within its valid bins.
    """
    lengths = mask.sum(dim=1).tolist()
    longest = min(max_bins, min(lengths))
    n_bins = int(rng.integers(min(min_bins, longest), longest + 1))
    starts = [int(rng.integers(0, n_valid - n_bins + 1)) for n_valid in lengths]
    windows = torch.stack([x[:, :, start : start + n_bins] for x, start in zip(spectrogram.float(), starts)])
    return rescale(windows, None, normalisation), torch.ones(len(starts), n_bins, dtype=torch.bool)


def random_time_offset(spectrogram, mask, rng, max_offset, normalisation=DEFAULT):
    """random_time_crop to L - k bins, k drawn uniformly in [0, max_offset], L the batch's shortest valid length."""
    shortest = int(mask.sum(dim=1).min())
    return random_time_crop(spectrogram, mask, rng, max(1, shortest - max_offset), shortest, normalisation)


def random_spectral_tilt(spectrogram, mask, rng, max_tilt, freqs, normalisation=DEFAULT):
    """(B, 3, F, T) padded batch -> the batch with each sample's log-magnitude tilted by t * log10(f), normalised
    again; mask unchanged.

    t is drawn uniformly in [-max_tilt, max_tilt] per sample, in the transform's normalised units (a fraction of the
    component's log10 range) per decade of frequency: with the shipped files' median range of 6.5 decades, 0.15 is
    a response f ** +-1. freqs (F,) in Hz; the 0 Hz bin takes the next bin's gain. Dead components stay zeros,
    padding stays zero.
    """
    tilts = torch.from_numpy(rng.uniform(-max_tilt, max_tilt, size=len(spectrogram))).float()
    gain = torch.from_numpy(np.log10(np.maximum(freqs, freqs[1]))).float()  # (F,)
    x = spectrogram.float()
    changed = x + tilts[:, None, None, None] * gain[None, None, :, None]
    return normalised_again(x, changed, mask, normalisation), mask


def random_noise_floor(spectrogram, mask, rng, max_floor, normalisation=DEFAULT):
    """(B, 3, F, T) padded batch -> the batch with noise power at a level f added to every bin, normalised again;
    mask unchanged.

    f is drawn uniformly in [0, max_floor] per sample, in the transform's normalised units (a fraction of the
    component's log10 range, taken as D = decades(normalisation)): a bin at x has the power 10^(2 D x) in those
    units, so adding the noise power 10^(2 D f) gives x' = log10(10^(2 D x) + 10^(2 D f)) / (2 D), a soft maximum
    of x and f. Dead components stay zeros, padding stays zero.
    """
    floors = torch.from_numpy(rng.uniform(0.0, max_floor, size=len(spectrogram))).float()[:, None, None, None]
    scale = 2 * decades(normalisation) * np.log(10.0)  # natural-log units of power per normalised unit
    x = spectrogram.float()
    return normalised_again(x, torch.logaddexp(scale * x, scale * floors) / scale, mask, normalisation), mask


def random_horizontal_swap(spectrogram, mask, rng, probability):
    """(B, 3, F, T) batch of components (E, N, Z) -> the batch with E and N exchanged in each sample with the given
    probability (drawn per sample); mask unchanged."""
    swapped = torch.from_numpy(rng.random(len(spectrogram)) < probability)[:, None, None, None]
    return torch.where(swapped, spectrogram[:, [1, 0, 2]], spectrogram), mask


def normalised_again(x, changed, mask, normalisation=DEFAULT):
    """`changed` (a bin-wise change of the padded batch x) normalised again per sample and component over the
    valid bins of mask (B, T); components dead in x and padding stay zeros."""
    valid = mask[:, None, None, :]  # (B, 1, 1, T)
    alive = extent(x, valid)[1] > 0
    return torch.where(alive & valid, rescale(changed, valid, normalisation), 0.0)


def rescale(windows, valid=None, normalisation=DEFAULT):
    """To [0, 1] per sample and component over the valid bins (a (B, 1, 1, T) mask; default all), as the transform
    (transform.NORMALISATIONS): min-max over (freq, time), or, for background-db, each row set over its median in
    time again (units stay decibels / the range); a constant component becomes zeros."""
    valid = torch.ones_like(windows, dtype=torch.bool) if valid is None else valid
    low, span = extent(windows, valid)
    if normalisation == "background-db":
        median = torch.where(valid, windows, np.nan).nanmedian(dim=3, keepdim=True).values
        return torch.where(span > 0, (windows - median + BACKGROUND_LEVEL).clamp(0.0, 1.0), 0.0)
    return torch.where(span > 0, (windows - low) / span.clamp_min(torch.finfo(windows.dtype).tiny), 0.0)


def extent(windows, valid):
    """(minimum, maximum - minimum) per sample and component over the valid bins: (B, 3, 1, 1) each."""
    low = torch.where(valid, windows, np.inf).amin(dim=(2, 3), keepdim=True)
    return low, torch.where(valid, windows, -np.inf).amax(dim=(2, 3), keepdim=True) - low


def rows_below(n_freq, n_valid):
    """(B, F) True on each sample's first n_valid (B,) frequency rows: those below its own Nyquist frequency."""
    return torch.arange(n_freq)[None, :] < n_valid[:, None]


def within_band(x, mask, n_valid, normalisation=DEFAULT):
    """train.py --nyquist_band: each sample's rows at and above its own Nyquist frequency (n_valid (B,) rows below it)
    filled with its last row below, then normalised again over its valid bins, as transform.spectrogram makes them:
    what an augmentation put there (a tilt, a noise floor) is gone. (B, 3, F, T) -> (B, 3, F, T) and (B, F) rows."""
    rows = rows_below(x.shape[2], n_valid)  # (B, F)
    if rows.all():
        return x, rows
    source = torch.minimum(torch.arange(x.shape[2])[None, :], n_valid[:, None] - 1)  # (B, F): each row's own or edge
    filled = x.float().gather(2, source[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
    return normalised_again(x.float(), filled, mask, normalisation), rows


def batch_rng(seed, epoch, rank, step):
    """The augmentation draws of one batch (step of an epoch) of one process: the same in a run resumed at any step."""
    return np.random.default_rng([seed, epoch, rank, step])


def augmentation(args, epoch, rank, freqs):
    """The epoch's augmentation of training batches for train.py's settings `args` (a crop or an offset, the spectral
    tilt, the noise floor, the horizontal swap), drawn per (seed, epoch, rank, step); None when all are off.
    freqs: the spectrogram's frequencies (Hz)."""
    min_bins, max_bins = args.crop_bins
    if not any((min_bins, args.offset_bins, args.spectral_tilt, args.noise_floor, args.horizontal_swap)):
        return None

    normalisation = args.normalisation

    def augment(x, mask, step):
        rng = batch_rng(args.seed, epoch, rank, step)
        if min_bins:
            x, mask = random_time_crop(x, mask, rng, min_bins, max_bins, normalisation)
        elif args.offset_bins:
            x, mask = random_time_offset(x, mask, rng, args.offset_bins, normalisation)
        if args.spectral_tilt:
            x, mask = random_spectral_tilt(x, mask, rng, args.spectral_tilt, freqs, normalisation)
        if args.noise_floor:
            x, mask = random_noise_floor(x, mask, rng, args.noise_floor, normalisation)
        if args.horizontal_swap:
            x, mask = random_horizontal_swap(x, mask, rng, args.horizontal_swap)
        return x, mask

    return augment
