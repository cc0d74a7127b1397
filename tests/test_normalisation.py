"""The default input, --normalisation background-db: each frequency row over its own median in time, in decibels
(transform.spectrogram), and the augmentations that normalise again doing the same (augment.rescale).

Real recordings: the shipped KNW file and its copy as an accelerometer would record it (differentiated).
"""

from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import flags
from waveform_files import real_stream

import train
from reading import augment
from reading.augment import BACKGROUND_LEVEL, random_noise_floor, random_spectral_tilt, rescale
from reading.spectrogram_cache import cache_key
from reading.transform import STFTConfig, spectrogram
from running.checkpoints import filled_in
from stft_dataset import SeismicSTFTDataset

BACKGROUND = STFTConfig()  # the default
MIN_MAX = STFTConfig(normalisation="min-max")


def real_waveform():
    return np.stack([trace.data for trace in real_stream()]).astype(np.float64)  # E, N, Z


def test_each_rows_median_in_time_is_the_background_level():
    x = spectrogram(real_waveform(), BACKGROUND)
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    middle = (x.shape[-1] - 1) // 2
    np.testing.assert_allclose(np.sort(x, axis=-1)[..., middle], BACKGROUND_LEVEL, atol=1e-6)
    assert (x > BACKGROUND_LEVEL + 0.2).mean() > 0.01  # the event rises above it (+12 dB and more)


def test_an_instruments_response_changes_min_max_and_hardly_background_db():
    # The same ground motion through a velocity sensor and an accelerometer (|H(f)| ~ f): min-max keeps the tilt.
    velocity = real_waveform()
    acceleration = np.gradient(velocity, axis=-1) * 100.0
    change = {}
    for stft in (MIN_MAX, BACKGROUND):
        change[stft.normalisation] = np.abs(spectrogram(velocity, stft) - spectrogram(acceleration, stft)).mean()
    assert change["background-db"] < 0.25 * change["min-max"], change


def test_normalised_again_over_the_whole_recording_gives_the_transforms_spectrogram():
    x = torch.from_numpy(spectrogram(real_waveform(), BACKGROUND))[None]
    torch.testing.assert_close(rescale(x, None, "background-db"), x, atol=1e-6, rtol=0)


def test_a_tilt_is_undone_and_a_noise_floor_lifts_the_quiet_bins():
    x = torch.from_numpy(spectrogram(real_waveform(), BACKGROUND))[None]
    mask = torch.ones(1, x.shape[-1], dtype=torch.bool)
    freqs = BACKGROUND.axes(0)[0]
    tilted, _ = random_spectral_tilt(x, mask, np.random.default_rng(0), 0.15, freqs, "background-db")
    inside = (x > 0) & (x < 1)  # bins the transform did not clip
    torch.testing.assert_close(tilted[inside], x[inside], atol=1e-5, rtol=0)
    floored, _ = random_noise_floor(x, mask, np.random.default_rng(1), 0.5, "background-db")
    quiet = x < BACKGROUND_LEVEL
    assert floored.shape == x.shape and floored.min() >= 0 and floored.max() <= 1
    assert (floored[quiet] - x[quiet]).mean() > 0.005 or not quiet.any()


def test_a_dead_component_stays_zeros():
    waveform = real_waveform()
    waveform[0] = 1234.0  # constant offset, no signal
    x = spectrogram(waveform, BACKGROUND)
    assert np.all(x[0] == 0) and np.isfinite(x).all()
    again = rescale(torch.from_numpy(x)[None], None, "background-db")
    assert (again[0, 0] == 0).all()


def test_an_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalisation"):
        STFTConfig(normalisation="z-score")


def test_the_cache_keeps_its_key_for_min_max_and_makes_another_for_background_db(real_dir, tmp_path):
    minmax = SeismicSTFTDataset(real_dir, stft=MIN_MAX, index_path=tmp_path / "index.json")
    background = SeismicSTFTDataset(real_dir, index_path=tmp_path / "index.json")
    (key, settings), (other, other_settings) = cache_key(minmax), cache_key(background)
    assert "normalisation" not in settings["stft"]  # caches made before the setting keep their key
    assert settings["normalisation"] == "log10 |STFT|, min-max per component"
    assert key != other and other_settings["normalisation"].startswith("log10 |STFT| over each frequency row")


def test_a_checkpoint_written_before_the_setting_reads_and_resumes_as_min_max():
    old = {"model_state": {}, "model_config": {}, "stft_config": asdict(MIN_MAX), "args": {"seed": 42}}
    del old["stft_config"]["normalisation"]
    checkpoint = filled_in(old)
    assert checkpoint["stft_config"]["normalisation"] == checkpoint["args"]["normalisation"] == "min-max"
    assert STFTConfig(**checkpoint["stft_config"]) == MIN_MAX


@pytest.mark.slow
def test_a_background_db_run_stores_its_normalisation_and_resumes_with_it(real_dir, tmp_path):
    common = dict(data_dir=real_dir, checkpoint_dir=tmp_path / "c", log_dir=tmp_path / "l", num_workers=0)
    first = train.main(flags(**common, num_epochs=1, batch_size=4, normalisation="background-db", offset_bins=8))
    checkpoint = torch.load(f"{first['run_dir']}/last.pt", weights_only=True)
    assert checkpoint["stft_config"]["normalisation"] == "background-db"
    assert np.isfinite(first["history"][-1]["val_loss"])
    resumed = train.main(flags(**common, resume=f"{first['run_dir']}/last.pt", num_epochs=2, normalisation="min-max"))
    checkpoint = torch.load(f"{resumed['run_dir']}/last.pt", weights_only=True)
    assert checkpoint["stft_config"]["normalisation"] == "background-db"  # a run setting: the checkpoint's is kept


def test_a_background_db_crop_is_its_window_set_over_its_own_median():
    x = torch.from_numpy(spectrogram(real_waveform(), BACKGROUND))[None]
    mask = torch.ones(1, x.shape[-1], dtype=torch.bool)
    cropped, _ = augment.random_time_crop(x, mask, np.random.default_rng(2), 30, 30, "background-db")
    middle = (cropped.shape[-1] - 1) // 2
    medians = cropped.sort(dim=-1).values[..., middle]
    alive = medians > 0  # a row the window holds unclipped at its middle
    torch.testing.assert_close(medians[alive], torch.full_like(medians[alive], BACKGROUND_LEVEL), atol=1e-6, rtol=0)
