"""Bins above a recording's own Nyquist frequency are drawn as no data: figures.show_spectrogram in every figure, and
the TensorBoard tiles of run_records.log_images and the projector thumbnails of embed.thumbnail."""

import numpy as np
import torch

import embed
from embedding.figures import plot_map, plot_reconstruction, plot_spectrogram_row
from model import ConvAutoencoder
from reading.transform import STFTConfig
from running.run_records import NO_DATA_RGB, log_images


def test_bins_above_nyquist_are_masked():
    stft = STFTConfig()
    spectrograms = [np.random.default_rng(0).random((3, stft.n_freq, 20), dtype=np.float32)] * 2
    figure = plot_spectrogram_row(spectrograms, ["40 Hz", "100 Hz"], stft, "test", [40.0, 100.0])
    masked, full = (ax.images[0].get_array() for ax in figure.axes[:2])
    n_valid = stft.bins_below_nyquist(40.0)
    assert np.ma.getmaskarray(masked)[n_valid:].all() and not np.ma.getmaskarray(masked)[:n_valid].any()
    assert not np.ma.getmaskarray(full).any()


def test_every_panel_of_a_reconstruction_masks_the_bins_above_nyquist():
    stft = STFTConfig()
    rng = np.random.default_rng(0)
    x, reconstruction = rng.random((2, 3, stft.n_freq, 20), dtype=np.float32)
    n_valid = stft.bins_below_nyquist(40.0)
    reconstruction[:, n_valid:] = 5.0  # an error where there is no data: neither drawn nor counted
    figure = plot_reconstruction(x, reconstruction, stft, "test", native_rate=40.0)
    images = [ax.images[0].get_array() for ax in figure.axes if ax.images]
    assert len(images) == 9
    for image in images:
        assert np.ma.getmaskarray(image)[n_valid:].all() and not np.ma.getmaskarray(image)[:n_valid].any()
    expected = ((reconstruction - x)[2, :n_valid] ** 2).mean()
    assert f"Z {expected:.4f}" in figure.get_suptitle()


def test_tensorboard_tiles_draw_the_bins_above_nyquist_grey():
    stft = STFTConfig()
    n_valid = stft.bins_below_nyquist(40.0)
    spectrograms = torch.from_numpy(np.random.default_rng(0).random((2, 3, stft.n_freq, 16), dtype=np.float32))
    batch = {"spectrogram": spectrograms, "mask": torch.ones(2, 16, dtype=torch.bool), "valid_bins": [n_valid, 129]}
    batch["meta"] = [{"path": "a_40Hz.mseed"}, {"path": "b_100Hz.mseed"}]
    tiles = {}

    class Writer:
        def add_image(self, tag, image, step, dataformats):
            tiles[tag] = image

    log_images(ConvAutoencoder(), batch, torch.device("cpu"), Writer(), 1)
    grey, full = tiles["reconstruction/0_a_40Hz"], tiles["reconstruction/1_b_100Hz"]
    assert grey.shape == full.shape == (3 * stft.n_freq, 32, 3)
    top = grey[: stft.n_freq]  # E, high frequencies first: its rows at and above 20 Hz are the first ones
    assert (top[: stft.n_freq - n_valid] == NO_DATA_RGB).all() and not (
        top[stft.n_freq - n_valid :] == NO_DATA_RGB
    ).all()
    assert not (full == NO_DATA_RGB).all(axis=-1).any()


def test_a_far_outlier_is_drawn_at_the_edge_of_the_map_not_setting_its_scale():
    xy = np.random.default_rng(0).uniform(-1, 1, size=(400, 2))
    xy[0] = (-100.0, 0.0)
    figure = plot_map(xy, {"coloured by cluster": np.zeros(400, dtype=int)})
    (ax,) = figure.axes
    assert ax.get_xlim()[0] > -10 and "1 beyond" in ax.get_title()
    assert plot_map(xy[1:], {"c": np.zeros(399, dtype=int)}).axes[0].get_title() == "c"  # none clipped: no note


def test_projector_thumbnails_draw_the_bins_above_nyquist_flat_grey():
    stft = STFTConfig()
    spectrogram = torch.from_numpy(np.random.default_rng(0).random((3, stft.n_freq, 40), dtype=np.float32))
    n_valid = stft.bins_below_nyquist(40.0)  # 52 of 129 bins: rows 13 and up of 32 hold none of them
    image = embed.thumbnail(spectrogram, n_valid)
    assert (image[: 32 - 13] == embed.NO_DATA_GREY).all() and not (image[32 - 13 :] == embed.NO_DATA_GREY).any()
    assert not (embed.thumbnail(spectrogram, stft.n_freq) == embed.NO_DATA_GREY).any()
