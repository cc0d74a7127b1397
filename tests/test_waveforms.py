"""waveforms.py on real recordings: component order and codes, gaps, trimming, padded ends, resampling.

Broken files are built in tmp_path from the shipped recordings (obspy read -> modify -> write) or taken from
obspy's own test data.
"""

import os

import numpy as np
import obspy
import pytest
import torch
from conftest import SHIPPED
from waveform_files import (
    KNW,
    N_FREQ,
    first_seconds,
    obspy_test_file,
    real_stream,
    reference_spectrogram,
    scipy_n_time,
    spectrogram_of,
    waveform_of,
    with_gap,
    write,
)

from reading.transform import STFTConfig
from reading.waveforms import DEFAULT_FAMILIES, UnusableFile, cut_window, read_waveform
from stft_dataset import SeismicSTFTDataset


@pytest.mark.parametrize("seconds, n_time", [(30, scipy_n_time(3001)), (70, 111), (90, 142)])
def test_real_file_cut_to_length_gives_scipy_shape(tmp_path, seconds, n_time):
    result = spectrogram_of(write(first_seconds(real_stream(), seconds), tmp_path, "cut.mseed"))
    assert result.shape == (3, N_FREQ, n_time) and result.dtype == np.float32
    assert result.min() == 0.0 and result.max() == 1.0  # min-max per component


def test_channels_are_ordered_east_north_vertical(tmp_path):
    stream = real_stream()
    stream.select(channel="HHN")[0].data[:] = 0
    stream.sort(keys=["channel"], reverse=True)  # Z, N, E in the file: order must come from the codes
    result = spectrogram_of(write(stream, tmp_path, "dead_north.mseed"))
    assert np.all(result[1] == 0)
    assert result[0].std() > 0.05 and result[2].std() > 0.05


def test_channels_follow_the_component_codes_not_the_trace_order(tmp_path):
    """Traces stored Z, E, N: channel 0 is E (made dead: all zeros), 1 is N and 2 is Z, each as scipy computes it."""
    stream = real_stream()
    stream.select(channel="HHE")[0].data[:] = 0
    stream.traces = [stream.select(channel=f"HH{code}")[0] for code in "ZEN"]
    path = write(stream, tmp_path, "zen.mseed")
    assert [trace.stats.channel for trace in obspy.read(path)] == ["HHZ", "HHE", "HHN"]
    result = spectrogram_of(path)
    expected = reference_spectrogram(np.stack([stream.select(channel=f"HH{c}")[0].data for c in "NZ"]).astype(float))
    assert np.all(result[0] == 0)
    np.testing.assert_allclose(result[1:], expected, atol=1e-5)
    assert np.abs(result[1] - result[2]).mean() > 0.01  # N and Z differ: a swap would show


def test_obspy_gappy_single_channel_file_is_skipped(tmp_path):
    directory = tmp_path / "gaps"
    directory.mkdir()
    path = obspy_test_file("io/mseed/tests/data/gaps.mseed", directory, "BW.BGLD.EH.mseed")  # EHE only, gaps
    dataset = SeismicSTFTDataset(str(directory))
    assert len(dataset) == 0 and dataset.skips.files[path][0] == "fewer than 3 components"
    assert "missing N, Z" in dataset.skips.files[path][1]


def test_unrotated_1_2_codes_map_to_north_east(tmp_path):
    stream = real_stream()
    for trace in stream:
        trace.stats.channel = {"HHE": "HH2", "HHN": "HH1"}.get(trace.stats.channel, trace.stats.channel)
    unrotated = write(stream, tmp_path, "unrotated.mseed")
    np.testing.assert_array_equal(spectrogram_of(unrotated), spectrogram_of(os.path.join(SHIPPED, KNW)))


def test_short_gap_is_interpolated(tmp_path):
    waveform = waveform_of(with_gap(0.5, tmp_path, "short_gap.mseed"))
    original = waveform_of(os.path.join(SHIPPED, KNW))
    assert waveform.shape == (3, 9001)
    np.testing.assert_array_equal(waveform[:, :3001], original[:, :3001])
    np.testing.assert_array_equal(waveform[:, 3050:], original[:, 3050:])
    np.testing.assert_allclose(waveform[2, 3000:3051], np.linspace(original[2, 3000], original[2, 3050], 51))


def test_components_of_different_length_trimmed_to_common_span(tmp_path):
    stream = real_stream()
    start = stream[0].stats.starttime
    stream.select(channel="HHE")[0].trim(start + 5, None)  # E starts 5 s late
    stream.select(channel="HHZ")[0].trim(None, start + 87)  # Z stops 3 s early
    waveform, meta = read_waveform(write(stream, tmp_path, "uneven.mseed"), DEFAULT_FAMILIES, STFTConfig())
    original = waveform_of(os.path.join(SHIPPED, KNW))
    np.testing.assert_array_equal(waveform, original[:, 500:8701])
    assert meta["starttime"] == str(start + 5)


def test_constant_ends_are_cut_off(tmp_path):
    """Zeros that pad a file's start (all components) and a held value at the end of one component are no recording."""
    stream = real_stream()
    start = stream[0].stats.starttime
    for trace in stream:
        trace.data[:500] = 0  # 5 s of padding
    east = stream.select(channel="HHE")[0].data
    east[-300:] = east[-301] + 7  # 3 s held at a value no neighbour has
    waveform, meta = read_waveform(write(stream, tmp_path, "padded.mseed"), DEFAULT_FAMILIES, STFTConfig())
    original = waveform_of(os.path.join(SHIPPED, KNW))
    np.testing.assert_array_equal(waveform, original[:, 500:-300])
    assert meta["starttime"] == str(start + 5)


def test_short_constant_ends_and_dead_components_are_kept(tmp_path):
    stream = real_stream()
    stream.select(channel="HHZ")[0].data[:50] = 0  # 0.5 s, under DEAD_END_SECONDS
    stream.select(channel="HHE")[0].data[:] = 0  # dead throughout: the transform makes it zeros
    waveform = waveform_of(write(stream, tmp_path, "short_constant.mseed"))
    assert waveform.shape == (3, 9001) and np.all(waveform[0] == 0) and np.all(waveform[2, :50] == 0)


def test_padding_leaving_under_one_stft_window_is_skipped(tmp_path):
    stream = real_stream()
    for trace in stream:
        trace.data[200:] = 0  # 2 s of signal, 88 s of padding
    with pytest.raises(UnusableFile, match="too short for one STFT window"):
        waveform_of(write(stream, tmp_path, "mostly_padding.mseed"))


def test_shipped_padded_file_keeps_its_recording_only():
    """PG.AR's file starts with 10.8 s of constant samples (1,084 on N): cut off, the recording spans [0, 1] again."""
    path = os.path.join(SHIPPED, "PG.AR.EH.19970801T101342.mseed")
    waveform, _ = read_waveform(path, DEFAULT_FAMILIES, STFTConfig())
    raw = np.stack([trace.data for trace in sorted(obspy.read(path), key=lambda t: t.stats.channel)])  # E, N, Z
    assert np.all(raw[1, :1084] == raw[1, 0]) and raw[1, 1084] != raw[1, 0]
    np.testing.assert_array_equal(waveform, raw[:, 1084:])


@pytest.mark.parametrize("sampling_rate", [40.0, 200.0])
def test_other_sampling_rates_are_resampled(tmp_path, sampling_rate):
    stream = real_stream()
    stream.resample(sampling_rate)
    result = spectrogram_of(write(stream, tmp_path, f"resampled_{sampling_rate:.0f}hz.mseed", encoding="FLOAT64"))
    original = spectrogram_of(os.path.join(SHIPPED, KNW))
    assert result.shape[:2] == original.shape[:2] == (3, N_FREQ)
    assert abs(result.shape[2] - original.shape[2]) <= 1
    low = slice(0, 40)  # below 15.6 Hz, inside the 20 Hz Nyquist band of the 40 Hz file
    n_time = min(result.shape[2], original.shape[2])
    correlation = np.corrcoef(result[2, low, :n_time].ravel(), original[2, low, :n_time].ravel())[0, 1]
    assert correlation > 0.9


PER_CHANNEL = os.path.join(os.path.dirname(__file__), "data", "per_channel")  # real one-channel-per-file recordings
# (station prefix, native rate): each was dropped as "gap too long ... samples after resampling" before cut_window
# fitted the resampled count; their components start off each other's sample grid
PER_CHANNEL_RECORDINGS = [("IV.MRGE.", 20.0), ("CH.LIENZ.", 40.0), ("Z3.A061A.", 50.0)]


def per_channel_copy(tmp_path, prefix):
    directory = tmp_path / prefix.strip(".")
    directory.mkdir()
    for name in sorted(os.listdir(PER_CHANNEL)):
        if name.startswith(prefix):
            os.symlink(os.path.join(PER_CHANNEL, name), directory / name)
    return directory


@pytest.mark.parametrize("prefix, rate", PER_CHANNEL_RECORDINGS)
def test_real_per_channel_recording_is_read_whatever_its_rate(tmp_path, prefix, rate):
    dataset = SeismicSTFTDataset(str(per_channel_copy(tmp_path, prefix)), families=("BH",))
    assert len(dataset) == 1 and dataset.recordings.rate[0] == rate
    spectrogram, meta = dataset[0]
    assert spectrogram is not None, meta.get("message")
    assert spectrogram.shape[0] == 3 and spectrogram.shape[-1] == dataset.time_bins()[0]


@pytest.mark.parametrize("prefix, rate", PER_CHANNEL_RECORDINGS)
def test_per_channel_and_merged_layouts_give_the_same_spectrogram(tmp_path, prefix, rate):
    per_channel = per_channel_copy(tmp_path, prefix)
    merged = tmp_path / "merged"
    merged.mkdir()
    stream = obspy.Stream()
    for name in sorted(os.listdir(per_channel)):
        stream += obspy.read(str(per_channel / name))
    stream.write(str(merged / f"{prefix}BH.merged.mseed"), format="MSEED")
    one = SeismicSTFTDataset(str(per_channel), families=("BH",))[0][0]
    other = SeismicSTFTDataset(str(merged), families=("BH",))[0][0]
    assert one is not None and other is not None
    # The same traces, resampled whole and cut to the same common span (waveforms.read_recording): not merely close.
    assert torch.equal(one, other)


def test_real_gap_splits_a_per_channel_recording_and_is_refused_in_one_file(tmp_path):
    directory = per_channel_copy(tmp_path, "CH.LIENZ.")
    name = next(n for n in sorted(os.listdir(directory)) if "BHN" in n)
    trace = obspy.read(str(directory / name))[0]
    os.remove(directory / name)
    gap_start = trace.stats.starttime + 60
    gapped = obspy.Stream([trace.slice(endtime=gap_start), trace.slice(starttime=gap_start + 30)])
    gapped.write(str(directory / name), format="MSEED")
    dataset = SeismicSTFTDataset(str(directory), families=("BH",))
    recordings = dataset.recordings
    assert len(dataset) == 2  # one recording on each side of the 30 s gap, neither across it
    assert recordings.end[0] <= gap_start.timestamp < gap_start.timestamp + 30 <= recordings.start[1]
    assert all(dataset[i][0] is not None for i in range(2))  # each read without the N trace across the gap
    merged = tmp_path / "merged"
    merged.mkdir()
    stream = (
        gapped
        + obspy.read(str(directory / name.replace("BHN", "BHE")))
        + obspy.read(str(directory / name.replace("BHN", "BHZ")))
    )
    stream.write(str(merged / "CH.LIENZ.BH.gap.mseed"), format="MSEED")
    spectrogram, meta = SeismicSTFTDataset(str(merged), families=("BH",))[0]
    assert spectrogram is None and meta["skip_reason"] == "gap too long" and "CH.LIENZ..BHN" in meta["message"]


@pytest.mark.parametrize("rate", [20.0, 40.0, 50.0, 100.0, 120.0, 200.0])
@pytest.mark.parametrize("offset", [0.0, 0.3, 0.5, 0.7])
def test_cut_window_gives_exactly_the_samples_of_its_length(rate, offset):
    n_native = int(95.37 * rate)
    trace = obspy.Trace(np.sin(np.arange(n_native) / 7.0), header={"sampling_rate": rate, "starttime": 1e9})
    start = 1e9 + (3 + offset) / rate  # off the trace's sample grid by `offset` of a sample
    seconds = (n_native - 3) / rate - start + 1e9  # to the trace's end, the last sample's interval included
    data = cut_window(trace, start, seconds, "XX.STA..BHZ", 100.0)
    assert len(data) == round(seconds * 100.0) and np.all(np.isfinite(data))


def test_cut_window_refuses_a_window_beyond_the_data():
    trace = obspy.Trace(np.zeros(4000), header={"sampling_rate": 40.0, "starttime": 1e9})
    with pytest.raises(UnusableFile, match="no data over the window: XX.STA..BHZ: data 2001-09-09"):
        cut_window(trace, 1e9 + 10, 95.0, "XX.STA..BHZ", 100.0)
