"""Real recordings and broken files that the tests build from them (tmp_path), shared by the test modules."""

import os
import shutil

import numpy as np
import obspy
import scipy.signal
from conftest import INCOMPLETE, SHIPPED

from reading.transform import STFTConfig, spectrogram
from reading.waveforms import DEFAULT_FAMILIES, read_waveform

KNW = "AZ.KNW.HH.20120808T165050.mseed"  # real HH file: 100 Hz, 90 s (9001 samples), HHE/HHN/HHZ
PFO = "AZ.PFO.HH.20120831T084343.mseed"  # a second HH station
OBSPY_DATA = os.path.dirname(obspy.__file__)
N_FREQ = 129  # nfft // 2 + 1 with the default nfft=256


def real_stream(name=KNW):
    return obspy.read(os.path.join(SHIPPED, name))


def write(stream, directory, name, **kwargs):
    path = os.path.join(str(directory), name)
    stream.write(path, format="MSEED", **kwargs)
    return path


def first_seconds(stream, seconds):
    start = stream[0].stats.starttime
    return stream.trim(start, start + seconds)


def waveform_of(path):
    return read_waveform(path, DEFAULT_FAMILIES, STFTConfig())[0]


def spectrogram_of(path):
    return spectrogram(waveform_of(path), STFTConfig())


def scipy_n_time(n_samples, nperseg=256, noverlap=192, nfft=256):
    return scipy.signal.stft(np.zeros(n_samples), nperseg=nperseg, noverlap=noverlap, nfft=nfft)[2].shape[-1]


def reference_spectrogram(
    waveform, fs=100.0, nperseg=256, noverlap=192, nfft=256, eps=1e-10, normalisation=STFTConfig.normalisation
):
    """The documented transform written out independently, one component at a time: min-max over the component, or
    (background-db) decibels of amplitude over each row's lower median in time, -10 dB -> 0 and +50 dB -> 1, clipped."""
    components = []
    for component in waveform:
        _, _, coefficients = scipy.signal.stft(
            component - component.mean(), fs=fs, nperseg=nperseg, noverlap=noverlap, nfft=nfft
        )
        log_magnitude = np.log10(np.abs(coefficients) + eps)
        if normalisation == "min-max":
            low, high = log_magnitude.min(), log_magnitude.max()
            components.append((log_magnitude - low) / (high - low))
        else:
            decibels = 20 * log_magnitude
            median = np.sort(decibels, axis=-1)[:, (decibels.shape[-1] - 1) // 2, None]
            components.append(np.clip((decibels - median + 10) / 60, 0, 1))
    return np.stack(components)


def obspy_test_file(relpath, directory, name):
    return shutil.copy(os.path.join(OBSPY_DATA, relpath), os.path.join(str(directory), name))


def empty_file(directory):
    return obspy_test_file("io/mseed/tests/data/bizarre/emptyfile.mseed", directory, "XX.EMPTY.HH.mseed")


def text_file(directory):
    path = os.path.join(str(directory), "XX.TEXT.HH.mseed")
    with open(path, "w") as f:
        f.write("#Network|Station|Location|Channel|Latitude|Longitude\nAZ|KNW||HHZ|33.71|-116.71\n" * 5)
    return path


def not_miniseed(directory):
    return obspy_test_file("io/mseed/tests/data/not.mseed", directory, "XX.NOT.HH.mseed")


def truncated_file(directory):
    """A real file cut after 10000 bytes, i.e. in the middle of its third 4096-byte record."""
    path = os.path.join(str(directory), "XX.TRUNC.HH.mseed")
    with open(os.path.join(SHIPPED, KNW), "rb") as source, open(path, "wb") as f:
        f.write(source.read(10000))
    return path


def broken_last_record(directory):
    return obspy_test_file("io/mseed/tests/data/brokenlastrecord.mseed", directory, "XX.BROKEN.EH.mseed")


def single_component(directory):
    return shutil.copy(os.path.join(INCOMPLETE, "NC.BBG.EH.20071020T014221.mseed"), str(directory))


def three_stations_unrotated(directory):
    """FFB1/FFB2/FFB3, each with complete HH1/HH2/HHZ and BH1/BH2/BHZ."""
    return obspy_test_file("core/tests/data/ffbx_unrotated_gaps.mseed", directory, "BW.FFBX.HH.mseed")


def two_stations(directory):
    return write(real_stream(KNW) + real_stream(PFO), directory, "AZ.KNWPFO.HH.mseed")


def nan_samples(directory):
    """Float64 copy of a real file with 1 s of NaN in the N component: passes a header read."""
    stream = real_stream()
    for trace in stream:
        trace.data = trace.data.astype(np.float64)
    stream.select(channel="HHN")[0].data[1000:1100] = np.nan
    return write(stream, directory, "AZ.KNW.HH.nan.mseed", encoding="FLOAT64")


def two_seconds(directory):
    return write(first_seconds(real_stream(), 2), directory, "AZ.KNW.HH.2s.mseed")


def with_gap(seconds, directory, name):
    """Real file whose Z trace misses `seconds` after 30 s (two Z traces with a gap between)."""
    stream = real_stream()
    z = stream.select(channel="HHZ")[0]
    stream.remove(z)
    start = z.stats.starttime
    stream.extend([z.slice(start, start + 30), z.slice(start + 30 + seconds, z.stats.endtime)])
    return write(stream, directory, name)


def long_gap(directory):
    return with_gap(2.0, directory, "AZ.KNW.HH.gap.mseed")


def apart(directory):
    """E holds the first 30 s and Z the last 30 s of a real file: no common time span."""
    stream = real_stream()
    start = stream[0].stats.starttime
    stream.select(channel="HHE")[0].trim(None, start + 30)
    stream.select(channel="HHZ")[0].trim(start + 40, None)
    return write(stream, directory, "AZ.KNW.HH.apart.mseed")


def two_rates(directory):
    """Z in two traces 0.5 s apart, the second resampled to 50 Hz: obspy merges no differing sampling rates."""
    stream = real_stream()
    z = stream.select(channel="HHZ")[0]
    stream.remove(z)
    start = z.stats.starttime
    second = z.slice(start + 30.5, z.stats.endtime)
    second.resample(50.0)
    stream.extend([z.slice(start, start + 30), second])
    for trace in stream:
        trace.data = trace.data.astype(np.float64)
    return write(stream, directory, "AZ.KNW.HH.rates.mseed", encoding="FLOAT64")
