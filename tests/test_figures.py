"""Bins above a recording's own Nyquist frequency are drawn as no data (figures.show_spectrogram)."""

import numpy as np

from embedding.figures import plot_spectrogram_row
from reading.transform import STFTConfig


def test_bins_above_nyquist_are_masked():
    stft = STFTConfig()
    spectrograms = [np.random.default_rng(0).random((3, stft.n_freq, 20), dtype=np.float32)] * 2
    figure = plot_spectrogram_row(spectrograms, ["40 Hz", "100 Hz"], stft, "test", [40.0, 100.0])
    masked, full = (ax.images[0].get_array() for ax in figure.axes[:2])
    n_valid = stft.bins_below_nyquist(40.0)
    assert np.ma.getmaskarray(masked)[n_valid:].all() and not np.ma.getmaskarray(masked)[:n_valid].any()
    assert not np.ma.getmaskarray(full).any()
