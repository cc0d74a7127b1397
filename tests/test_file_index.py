"""file_index.py: the header index of a data directory (kept, refreshed, rebuilt, never fatal), find_files."""

import os
import shutil

import numpy as np
import obspy
import pytest
from conftest import SHIPPED, copy_files, shipped_files
from waveform_files import KNW, empty_file, real_stream

from reading import file_index
from reading.file_index import build_index, find_files
from stft_dataset import SeismicSTFTDataset


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
