"""stft_dataset: channel families, unusable files skipped with their reasons, pad_collate.

Broken files are built in tmp_path from the real shipped recordings (obspy read -> modify -> write)
or taken from obspy's own test data.
"""

import os
import shutil
from collections import Counter

import pytest
import torch
from conftest import INCOMPLETE, SHIPPED, copy_files
from waveform_files import (
    KNW,
    N_FREQ,
    apart,
    broken_last_record,
    empty_file,
    first_seconds,
    long_gap,
    nan_samples,
    not_miniseed,
    real_stream,
    scipy_n_time,
    single_component,
    text_file,
    three_stations_unrotated,
    truncated_file,
    two_rates,
    two_seconds,
    two_stations,
    write,
)

import stft_dataset
import test_pipeline
from reading.file_index import find_files
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate


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


def test_missing_data_directory_raises():
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        SeismicSTFTDataset("/nonexistent/no_such_dir")


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
