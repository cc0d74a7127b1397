"""The transform, in one place: (3, n_samples) waveform -> normalised log-magnitude STFT (3, n_freq, n_time).

`STFTConfig` holds its settings (stored in every checkpoint); `spectrogram` applies it. Nothing
else in the repository calls scipy.signal.stft.
"""

from dataclasses import dataclass

import numpy as np
import scipy.signal

# Below one count in an int32 full scale (1 / 2**31 > 1e-10), so any real variation of integer data counts as alive.
DEAD_RELATIVE_LEVEL = 1e-10
# STFTConfig.normalisation -> what it is (written in every spectrogram cache's settings.json)
NORMALISATIONS = {
    "min-max": "log10 |STFT|, min-max per component",
    "background-db": "log10 |STFT| over each frequency row's median in time, -10 to +50 dB, per component",
}
BACKGROUND_DB = (-10.0, 50.0)  # background-db: decibels over a row's time median mapped to 0 and 1 (clipped)


@dataclass(frozen=True)
class STFTConfig:
    """Settings of the transform; stored in every checkpoint. Same meaning as scipy.signal.stft."""

    sampling_rate: float = 100.0  # Hz; every waveform is resampled to it first
    nperseg: int = 256  # samples per window (2.56 s at 100 Hz)
    noverlap: int = 192  # samples shared by neighbouring windows (hop 64 samples = 0.64 s)
    nfft: int = 256  # FFT length: nfft // 2 + 1 frequency bins, 0 to sampling_rate / 2
    eps: float = 1e-10  # added to |STFT| before log10 so that silent bins stay finite
    normalisation: str = "background-db"  # NORMALISATIONS key: how log10 |STFT| is brought to [0, 1]

    def __post_init__(self):
        if not 0 <= self.noverlap < self.nperseg:
            raise ValueError(f"need 0 <= noverlap < nperseg, got noverlap={self.noverlap}, nperseg={self.nperseg}")
        if self.nfft < self.nperseg:
            raise ValueError(f"need nfft >= nperseg, got nfft={self.nfft}, nperseg={self.nperseg}")
        if self.sampling_rate <= 0 or self.eps <= 0:
            raise ValueError("sampling_rate and eps must be positive")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {self.normalisation!r}")

    @property
    def hop(self):
        """Samples from one STFT window to the next."""
        return self.nperseg - self.noverlap

    @property
    def n_freq(self):
        return self.nfft // 2 + 1

    def n_time_bins(self, n_samples):
        """Time bins scipy.signal.stft gives for `n_samples` samples (an int or an integer array) with its defaults:
        nperseg // 2 zeros at each end, then zero padding to whole segments."""
        return -(-(n_samples + 2 * (self.nperseg // 2) - self.nperseg) // self.hop) + 1

    def bins_below_nyquist(self, native_rate=None):
        """Frequency bins below the Nyquist frequency of a recording sampled at native_rate Hz (all bins for None or a
        rate at least sampling_rate): the bins that hold its data once it is resampled to sampling_rate."""
        if native_rate is None or native_rate >= self.sampling_rate:
            return self.n_freq
        freqs = np.fft.rfftfreq(self.nfft, d=1.0 / self.sampling_rate)
        return max(1, int(np.count_nonzero(freqs < native_rate / 2)))

    def axes(self, n_time):
        """Frequencies (Hz) and window-centre times (s) of a spectrogram, as scipy.signal.stft gives them."""
        freqs = np.fft.rfftfreq(self.nfft, d=1.0 / self.sampling_rate)
        times = np.arange(n_time) * self.hop / self.sampling_rate
        return freqs, times


def background_level(log_magnitude):
    """background-db: log10 |STFT| (..., F, T) -> (..., F, 1), each frequency row's median over time: the level of
    what the station records most of the time at that frequency (its noise, its instrument's response). The lower
    median (of an even count, the smaller middle value), as torch.nanmedian takes it when augment.rescale sets a
    window over its median again."""
    middle = (log_magnitude.shape[-1] - 1) // 2
    return np.partition(log_magnitude, middle, axis=-1)[..., middle : middle + 1]


def spectrogram(waveform, stft, native_rate=None):
    """(3, n_samples) waveform -> (3, n_freq, n_time) float32 in [0, 1].

    Demean, |scipy.signal.stft|, log10(. + eps), then per component either min-max ("min-max") or, for
    "background-db", each frequency row over its own median in time (SpecUFEx divides by the median), in decibels
    from BACKGROUND_DB[0] (0) to BACKGROUND_DB[1] (1), clipped: a station's noise floor and its instrument's response,
    constant in time, no longer tell recordings apart, what rises above them does. A constant
    (dead) component, also one constant only up to float rounding, becomes all zeros, never NaN.
    native_rate: the recording's own sampling rate (Hz) before resampling; bins at and above its Nyquist frequency
    (20 Hz for a 40 Hz BH trace) hold no data: they take no part in the min-max and repeat the last bin below it.
    """
    level = np.abs(waveform).max(axis=-1)
    waveform = waveform - waveform.mean(axis=-1, keepdims=True)
    # Dead: constant up to float rounding (e.g. left by FFT resampling), which min-max would blow up to [0, 1].
    dead = np.abs(waveform).max(axis=-1) <= DEAD_RELATIVE_LEVEL * level
    _, _, coefficients = scipy.signal.stft(
        waveform, fs=stft.sampling_rate, nperseg=stft.nperseg, noverlap=stft.noverlap, nfft=stft.nfft, axis=-1
    )
    log_magnitude = np.log10(np.abs(coefficients) + stft.eps)  # (3, freq, time)
    n_valid = stft.bins_below_nyquist(native_rate)
    log_magnitude[:, n_valid:] = log_magnitude[:, n_valid - 1 : n_valid]  # no data: the edge of the data repeated
    if stft.normalisation == "background-db":
        low, high = (db / 20.0 for db in BACKGROUND_DB)  # decibels of amplitude -> log10 units
        scaled = np.clip((log_magnitude - background_level(log_magnitude) - low) / (high - low), 0.0, 1.0)
    else:
        low = log_magnitude.min(axis=(1, 2), keepdims=True)
        span = log_magnitude.max(axis=(1, 2), keepdims=True) - low
        scaled = (log_magnitude - low) / np.where(span > 0, span, 1.0)
    scaled[dead] = 0.0
    return scaled.astype(np.float32)
