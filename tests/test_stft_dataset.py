"""stft_dataset: the STFT against scipy, shapes, channel choice, unusable files, the header index, batching.

Broken files are built in tmp_path from the real shipped recordings (obspy read -> modify -> write)
or taken from obspy's own test data; only the unit tests of `spectrogram` use synthetic signals.
"""

import os
import shutil
from collections import Counter

import numpy as np
import obspy
import pytest
import scipy.signal
import torch
from conftest import INCOMPLETE, SHIPPED, copy_files, shipped_files

import file_index
import stft_dataset
import test_pipeline
from file_index import build_index, find_files
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate
from transform import STFTConfig, spectrogram
from waveforms import DEFAULT_FAMILIES, UnusableFile, read_waveform

KNW = "AZ.KNW.HH.20120808T165050.mseed"  # real HH file: 100 Hz, 90 s (9001 samples), HHE/HHN/HHZ
PFO = "AZ.PFO.HH.20120831T084343.mseed"  # a second HH station
OBSPY_DATA = os.path.dirname(obspy.__file__)
N_FREQ = 129  # nfft // 2 + 1 with the default nfft=256


# --- helpers -------------------------------------------------------------------------------------


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


def reference_spectrogram(waveform, fs=100.0, nperseg=256, noverlap=192, nfft=256, eps=1e-10):
    """The documented transform written out independently, one component at a time."""
    components = []
    for component in waveform:
        _, _, coefficients = scipy.signal.stft(
            component - component.mean(), fs=fs, nperseg=nperseg, noverlap=noverlap, nfft=nfft
        )
        log_magnitude = np.log10(np.abs(coefficients) + eps)
        low, high = log_magnitude.min(), log_magnitude.max()
        components.append((log_magnitude - low) / (high - low))
    return np.stack(components)


def obspy_test_file(relpath, directory, name):
    return shutil.copy(os.path.join(OBSPY_DATA, relpath), os.path.join(str(directory), name))


# Builders of unusable files: each writes one file into `directory` and returns its path.


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


# --- spectrogram against scipy -------------------------------------------------------------------


def test_spectrogram_equals_direct_scipy_stft_on_real_waveform():
    waveform = np.stack([trace.data for trace in real_stream()]).astype(np.float64)  # E, N, Z
    np.testing.assert_allclose(spectrogram(waveform, STFTConfig()), reference_spectrogram(waveform), atol=1e-6)


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


# --- shapes and component order on real files ----------------------------------------------------


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


# --- channel families, read from the trace headers -----------------------------------------------


def test_family_filter_keeps_only_hh(real_dir, tmp_path):
    dataset = SeismicSTFTDataset(real_dir, families=("HH",))
    assert [name.split(".")[2] for name in dataset.files] == ["HH", "HH"]
    assert dataset.excluded == Counter({"HN": 2, "EH": 2, "BH": 2})
    assert all(dataset[i][1]["family"] == "HH" for i in range(len(dataset)))


def test_shipped_directory_default_families(tmp_path):
    before = sorted(os.listdir(SHIPPED))
    dataset = SeismicSTFTDataset(SHIPPED, index_path=str(tmp_path / "index.json"))
    assert len(dataset) == 163 and len(find_files(SHIPPED)) == 214
    assert dataset.excluded == Counter({"DP": 41, "EL": 8, "HL": 2})
    assert dataset.skips.files == {}
    assert sorted(os.listdir(SHIPPED)) == before and os.path.exists(tmp_path / "index.json")


def test_smoke_test_leaves_the_shipped_directory_unchanged(tmp_path):
    before = os.stat(SHIPPED).st_mtime_ns, sorted(os.listdir(SHIPPED))
    test_pipeline.check_dataset({"tmp": str(tmp_path)})
    assert (os.stat(SHIPPED).st_mtime_ns, sorted(os.listdir(SHIPPED))) == before  # no index written there
    assert (tmp_path / "index.json").exists()


def test_family_comes_from_headers_not_file_name(tmp_path):
    directory = tmp_path / "renamed"
    directory.mkdir()
    shutil.copy(os.path.join(SHIPPED, KNW), directory / "XX.YYY.BH.20120808T165050.mseed")
    broadband = SeismicSTFTDataset(str(directory), families=("BH",), index_path=str(tmp_path / "bh.json"))
    assert len(broadband) == 0 and broadband.excluded == Counter({"HH": 1})
    high_rate = SeismicSTFTDataset(str(directory), families=("HH",), index_path=str(tmp_path / "hh.json"))
    assert len(high_rate) == 1 and high_rate[0][1]["trace_id"] == "AZ.KNW..HH?"


def test_single_component_of_unrequested_family_is_excluded_not_skipped(tmp_path):
    directory = copy_files(["NC.KCR.SH.20100305T062052.mseed"], tmp_path / "sh", source=INCOMPLETE)
    dataset = SeismicSTFTDataset(directory)
    assert len(dataset) == 0 and dataset.excluded == Counter({"SH": 1}) and dataset.skips.files == {}


# --- unusable files: skipped with a reason, never an exception -----------------------------------


@pytest.mark.parametrize(
    "build, reason",
    [
        (empty_file, "empty file"),
        (text_file, "not readable as miniSEED"),
        (not_miniseed, "not readable as miniSEED"),
        (truncated_file, "damaged or truncated miniSEED"),
        (broken_last_record, "damaged or truncated miniSEED"),
        (single_component, "fewer than 3 components"),
        (three_stations_unrotated, "unresolvable mixture"),
        (two_stations, "unresolvable mixture"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_file_unusable_by_headers_is_skipped_with_reason(tmp_path, caplog, build, reason):
    directory = copy_files([KNW], tmp_path / "waveforms")
    path = build(directory)
    dataset = SeismicSTFTDataset(directory)
    assert list(dataset.files) == [KNW]
    assert dataset.skips.files[path][0] == reason
    assert f"skipping {path}: {reason}" in caplog.text
    assert dataset[0][0].shape == (3, N_FREQ, 142)


@pytest.mark.parametrize(
    "build, reason, detail",
    [
        (nan_samples, "NaN or infinite samples", "AZ.KNW..HHN"),
        (two_seconds, "too short for one STFT window", "201 common samples < nperseg=256"),
        (long_gap, "gap too long", "AZ.KNW..HHZ"),
        (apart, "components do not overlap", "AZ.KNW..HH?"),
        (two_rates, "unmergeable traces", "AZ.KNW..HHZ"),
    ],
    ids=["nan_samples", "two_seconds", "long_gap", "apart", "two_rates"],
)
def test_file_unusable_on_full_read_is_dropped_by_collate(tmp_path, caplog, build, reason, detail):
    directory = copy_files([KNW], tmp_path / "waveforms")
    path = build(directory)
    dataset = SeismicSTFTDataset(directory)
    assert len(dataset) == 2 and dataset.skips.files == {}  # headers look fine
    broken = list(dataset.files).index(os.path.basename(path))
    spectrogram_or_none, meta = dataset[broken]
    assert spectrogram_or_none is None and meta["skip_reason"] == reason and detail in meta["message"]
    batch = pad_collate([dataset[0], dataset[1]])
    assert batch["spectrogram"].shape == (1, 3, N_FREQ, 142) and batch["meta"][0]["path"].endswith(KNW)
    assert batch["skipped"] == [(path, reason, meta["message"])]
    skips = SkipLog()
    for skipped in batch["skipped"] * 2:  # what train.py / inference.py do with every batch
        skips.add(*skipped)
    assert skips.counts() == {reason: 1} and caplog.text.count(f"skipping {path}") == 1


def test_unexpected_error_while_reading_is_a_skip_not_a_crash(real_dir, monkeypatch):
    dataset = SeismicSTFTDataset(real_dir)

    def fails(*args):
        raise RuntimeError("decoder state lost")

    monkeypatch.setattr(stft_dataset, "read_waveform", fails)
    spectrogram_or_none, meta = dataset[0]
    assert spectrogram_or_none is None and meta["skip_reason"] == "unexpected error"
    assert meta["message"] == "RuntimeError: decoder state lost" and meta["path"].endswith(dataset.files[0])


def test_obspy_gappy_single_channel_file_is_skipped(tmp_path):
    directory = tmp_path / "gaps"
    directory.mkdir()
    path = obspy_test_file("io/mseed/tests/data/gaps.mseed", directory, "BW.BGLD.EH.mseed")  # EHE only, gaps
    dataset = SeismicSTFTDataset(str(directory))
    assert len(dataset) == 0 and dataset.skips.files[path][0] == "fewer than 3 components"
    assert "missing N, Z" in dataset.skips.files[path][1]


def test_missing_data_directory_raises():
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        SeismicSTFTDataset("/nonexistent/no_such_dir")


# --- component handling --------------------------------------------------------------------------


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


# --- the header index ----------------------------------------------------------------------------


def refuse(*args, **kwargs):
    raise AssertionError("file read although the index is up to date")


def test_second_construction_reads_no_file(real_dir, tmp_path, monkeypatch):
    index_path = str(tmp_path / "index.npz")
    first = SeismicSTFTDataset(real_dir, index_path=index_path)
    with np.load(index_path) as stored:
        assert stored["version"] == file_index.INDEX_VERSION and len(stored["path"]) == 8
        assert len(stored["trace_code"]) == 24 and stored["trace_start"].dtype == np.float64
    monkeypatch.setattr(file_index, "header_record", refuse)
    monkeypatch.setattr(file_index, "read_stream", refuse)
    monkeypatch.setattr(obspy, "read", refuse)
    second = SeismicSTFTDataset(real_dir, index_path=index_path)
    assert list(second.files) == list(first.files) and len(second) == 8


def count_header_reads(monkeypatch):
    read = []
    original = file_index.header_record
    monkeypatch.setattr(file_index, "header_record", lambda path: read.append(path) or original(path))
    return read


def test_modified_and_new_files_are_read_again(real_dir, tmp_path, monkeypatch):
    index_path = str(tmp_path / "index.npz")
    SeismicSTFTDataset(real_dir, index_path=index_path)
    touched, replaced = (os.path.join(real_dir, name) for name in sorted(os.listdir(real_dir))[:2])
    os.utime(touched, ns=(0, os.stat(touched).st_mtime_ns + 10**9))  # same bytes, new mtime
    with open(replaced, "r+b") as f:
        f.truncate(10000)  # new size, now damaged
    added = shutil.copy(os.path.join(SHIPPED, shipped_files(("HH",), per_family=3)[2]), real_dir)
    read = count_header_reads(monkeypatch)
    dataset = SeismicSTFTDataset(real_dir, index_path=index_path)
    assert sorted(read) == sorted([touched, replaced, added])
    assert len(dataset) == 8 and os.path.basename(added) in dataset.files  # 9 files, 1 now damaged
    assert dataset.skips.files[replaced][0] == "damaged or truncated miniSEED"


def test_default_index_lives_in_data_dir_and_is_not_data(real_dir):
    SeismicSTFTDataset(real_dir)
    assert os.path.exists(os.path.join(real_dir, ".stft_index.npz"))
    assert len(SeismicSTFTDataset(real_dir)) == 8


@pytest.mark.parametrize("where", ["under_a_file", "is_a_directory"])
def test_unwritable_index_path_does_not_crash(real_dir, tmp_path, caplog, where):
    blocker = tmp_path / "blocker"
    if where == "under_a_file":
        blocker.write_text("a plain file")
        index_path = str(blocker / "index.json")
    else:
        blocker.mkdir()
        index_path = str(blocker)
    assert len(SeismicSTFTDataset(real_dir, index_path=index_path)) == 8
    assert "could not store the index" in caplog.text


def test_corrupt_index_is_ignored(real_dir, tmp_path, caplog):
    index_path = tmp_path / "index.npz"
    SeismicSTFTDataset(real_dir, index_path=str(index_path))
    index_path.write_bytes(index_path.read_bytes()[:3000])  # e.g. a disk that filled up
    assert len(SeismicSTFTDataset(real_dir, index_path=str(index_path))) == 8
    assert "ignoring unreadable index" in caplog.text
    with np.load(index_path) as stored:
        assert len(stored["path"]) == 8


@pytest.mark.parametrize("content", ["[]", '{"version": 1, "files": []}'])
def test_index_with_foreign_json_layout_is_ignored(real_dir, tmp_path, content):
    """build_index catches ValueError/KeyError for a bad index, but valid JSON of another layout
    raises AttributeError from `content.get` / `stored.get` and the dataset cannot be built."""
    index_path = tmp_path / "index.json"
    index_path.write_text(content)
    assert len(SeismicSTFTDataset(real_dir, index_path=str(index_path))) == 8


def test_index_from_other_version_is_rebuilt(real_dir, tmp_path, monkeypatch):
    index_path = tmp_path / "index.npz"
    SeismicSTFTDataset(real_dir, index_path=str(index_path))
    with np.load(index_path) as stored:
        columns = dict(stored)
    np.savez(index_path.open("wb"), **(columns | {"version": file_index.INDEX_VERSION + 1}))
    read = count_header_reads(monkeypatch)
    SeismicSTFTDataset(real_dir, index_path=str(index_path))
    with np.load(index_path) as stored:
        assert len(read) == 8 and stored["version"] == file_index.INDEX_VERSION


def test_build_index_records_errors_and_seed_ids(tmp_path):
    directory = copy_files([KNW], tmp_path / "waveforms")
    empty = empty_file(directory)
    index = build_index(directory, index_path=str(tmp_path / "index.npz"))
    knw, empty_row = index.path.tolist().index(KNW), index.path.tolist().index(os.path.basename(empty))
    assert index.seed_ids(knw) == ("AZ.KNW..HHE", "AZ.KNW..HHN", "AZ.KNW..HHZ")
    stream = real_stream()
    assert index.trace_start[index.traces(knw)].tolist() == [t.stats.starttime.timestamp for t in stream]
    assert index.trace_end[index.traces(knw)].tolist() == [t.stats.endtime.timestamp for t in stream]
    assert index.trace_rate[index.traces(knw)].tolist() == [100.0] * 3
    assert index.error_reason[empty_row] == "empty file" and index.n_traces[empty_row] == 0
    assert index.size[knw] == os.path.getsize(os.path.join(SHIPPED, KNW))


# --- pad_collate ---------------------------------------------------------------------------------


def test_pad_collate_pads_to_longest_with_mask(tmp_path):
    directory = tmp_path / "lengths"
    directory.mkdir()
    for seconds in (30, 70, 90):
        write(first_seconds(real_stream(), seconds), directory, f"AZ.KNW.HH.{seconds:03d}s.mseed")
    dataset = SeismicSTFTDataset(str(directory))
    samples = [dataset[i] for i in range(3)]
    batch = pad_collate(samples)
    lengths = [scipy_n_time(3001), 111, 142]
    assert batch["spectrogram"].shape == (3, 3, N_FREQ, 142) and batch["mask"].shape == (3, 142)
    assert batch["mask"].dtype == torch.bool and batch["mask"].sum(dim=1).tolist() == lengths
    for row, ((spectrogram_, meta), n_time) in enumerate(zip(samples, lengths)):
        assert batch["mask"][row, :n_time].all() and not batch["mask"][row, n_time:].any()
        assert torch.equal(batch["spectrogram"][row, :, :, :n_time], spectrogram_)
        assert torch.all(batch["spectrogram"][row, :, :, n_time:] == 0)
        assert batch["meta"][row] == meta
    assert batch["skipped"] == []


def test_pad_collate_all_failed(tmp_path):
    directory = tmp_path / "broken"
    directory.mkdir()
    nan_path, short_path = nan_samples(directory), two_seconds(directory)
    dataset = SeismicSTFTDataset(str(directory))
    batch = pad_collate([dataset[0], dataset[1]])
    assert batch["spectrogram"] is None and batch["mask"] is None and batch["meta"] == []
    assert sorted((path, reason) for path, reason, _ in batch["skipped"]) == sorted(
        [(nan_path, "NaN or infinite samples"), (short_path, "too short for one STFT window")]
    )


# --- find_files ----------------------------------------------------------------------------------


def test_find_files_recursive_and_case_insensitive(tmp_path):
    names = [
        "a.mseed",
        "sub/b.MSEED",
        "sub/deeper/c.miniseed",
        "d.ms",
        "sub/e.MSD",
        "f.sac",
        "g.mseed.bak",
        "notes.txt",
        ".stft_index.npz",
        "mseed",
        ".hidden/h.mseed",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_files(str(tmp_path)) == sorted(["a.mseed", "d.ms", "sub/b.MSEED", "sub/deeper/c.miniseed", "sub/e.MSD"])
    assert find_files(str(tmp_path), extensions=(".MS",)) == ["d.ms"]
