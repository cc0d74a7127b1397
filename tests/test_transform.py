"""transform.py: the one STFT against scipy.signal.stft (shapes, axes, settings), dead components.

Only these unit tests of `spectrogram` use synthetic signals; the rest read the shipped recordings.
"""

import numpy as np
import pytest
import scipy.signal
from waveform_files import real_stream, reference_spectrogram, scipy_n_time, spectrogram_of, write

from reading.transform import STFTConfig, spectrogram


@pytest.mark.parametrize("normalisation", ["background-db", "min-max"])
def test_spectrogram_equals_direct_scipy_stft_on_real_waveform(normalisation):
    waveform = np.stack([trace.data for trace in real_stream()]).astype(np.float64)  # E, N, Z
    result = spectrogram(waveform, STFTConfig(normalisation=normalisation))
    np.testing.assert_allclose(result, reference_spectrogram(waveform, normalisation=normalisation), atol=1e-6)


def test_spectrogram_equals_scipy_with_other_settings():
    waveform = np.random.default_rng(0).normal(size=(3, 3000)) * [[1.0], [1e3], [1e-3]]
    stft = STFTConfig(nperseg=128, noverlap=100, nfft=512)
    result = spectrogram(waveform, stft)
    np.testing.assert_allclose(result, reference_spectrogram(waveform, nperseg=128, noverlap=100, nfft=512), atol=1e-6)
    assert result.shape == (3, 257, scipy_n_time(3000, 128, 100, 512)) and result.dtype == np.float32


@pytest.mark.parametrize("nperseg, noverlap, nfft", [(256, 192, 256), (128, 64, 128), (128, 96, 512), (200, 0, 256)])
def test_settings_change_shape_as_scipy_says(nperseg, noverlap, nfft):
    waveform = np.random.default_rng(1).normal(size=(3, 4000))
    stft = STFTConfig(nperseg=nperseg, noverlap=noverlap, nfft=nfft)
    expected = scipy.signal.stft(waveform, nperseg=nperseg, noverlap=noverlap, nfft=nfft)[2].shape
    assert spectrogram(waveform, stft).shape == expected
    assert stft.n_freq == expected[1]


@pytest.mark.parametrize("stft", [STFTConfig(), STFTConfig(sampling_rate=40.0, nperseg=128, noverlap=96, nfft=512)])
def test_axes_match_scipy_frequencies_and_times(stft):
    f, t, _ = scipy.signal.stft(
        np.zeros(9001), fs=stft.sampling_rate, nperseg=stft.nperseg, noverlap=stft.noverlap, nfft=stft.nfft
    )
    freqs, times = stft.axes(len(t))
    np.testing.assert_allclose(freqs, f)
    np.testing.assert_allclose(times, t)


@pytest.mark.parametrize(
    "settings", [dict(noverlap=256), dict(noverlap=-1), dict(nfft=128), dict(eps=0.0), dict(sampling_rate=0.0)]
)
def test_invalid_settings_rejected(settings):
    with pytest.raises(ValueError):
        STFTConfig(**settings)


def test_dead_component_gives_finite_zeros(tmp_path):
    stream = real_stream()
    stream.select(channel="HHE")[0].data[:] = 0
    stream.select(channel="HHZ")[0].data[:] = 1234  # constant offset in counts, no signal
    result = spectrogram_of(write(stream, tmp_path, "dead.mseed"))
    assert np.all(np.isfinite(result))
    assert np.all(result[0] == 0) and np.all(result[2] == 0) and result[1].max() == 1.0


def test_constant_component_of_resampled_file_gives_zeros(tmp_path):
    """A dead channel at a constant offset in a 200 Hz file must not become stretched rounding noise.

    spectrogram's docstring: a constant component "becomes all zeros". After the FFT resampling to
    100 Hz the constant carries ~1e-12 of rounding noise (a float constant such as 0.1 keeps a
    ~1e-17 residue after demeaning even without resampling); the exact `span > 0` test then
    min-max scales that noise to the full [0, 1] range.
    """
    stream = real_stream()
    stream.resample(200.0)
    stream.select(channel="HHE")[0].data[:] = 1234.0
    result = spectrogram_of(write(stream, tmp_path, "dead_east_200hz.mseed", encoding="FLOAT64"))
    assert np.all(np.isfinite(result))
    assert result[0].max() == 0.0
