"""The spectrogram cache (SpectrogramCache) and parallel header indexing, on the real shipped recordings.

Reference values come from the same dataset without a cache; cached spectrograms are float16, so they
may differ by half a float16 step in [0.5, 1] (2**-12) and no more.
"""

import dataclasses
import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import SHIPPED, copy_files, flags, shipped_files
from torch.utils.data import DataLoader, Subset
from waveform_files import empty_file, nan_samples, truncated_file

import stft_dataset
import train
from reading import file_index, spectrogram_cache
from reading.file_index import build_index
from reading.spectrogram_cache import SpectrogramCache
from reading.transform import STFTConfig
from stft_dataset import SeismicSTFTDataset, pad_collate

FLOAT16_ROUNDING = 2**-12  # half the float16 step between 0.5 and 1: the largest rounding error in [0, 1]
EXTRA_HH, EXTRA_BH = shipped_files(("HH",), per_family=3)[2], shipped_files(("BH",), per_family=3)[2]  # not in real_dir


# --- helpers -------------------------------------------------------------------------------------


def cached(directory, cache_dir, processes=1, **kwargs):
    return SeismicSTFTDataset(directory, cache_dir=str(cache_dir), processes=processes, **kwargs)


def items(dataset):
    return [dataset[i] for i in range(len(dataset))]


def assert_same_items(cached_items, reference_items):
    assert len(cached_items) == len(reference_items)
    for (x, meta), (expected, expected_meta) in zip(cached_items, reference_items):
        assert meta == expected_meta
        if expected is None:
            assert x is None
            continue
        assert x.dtype == torch.float16 and x.shape == expected.shape  # as stored; train.py converts on the device
        assert (x.float() - expected).abs().max() <= FLOAT16_ROUNDING


def count_waveform_reads(monkeypatch):
    """Paths given to read_waveform from now on (in this process: build caches with processes=1)."""
    read = []
    original = stft_dataset.read_waveform
    monkeypatch.setattr(stft_dataset, "read_waveform", lambda path, *args: read.append(path) or original(path, *args))
    return read


def refuse(*args, **kwargs):
    raise AssertionError("spectrogram computed although the cache is up to date")


def refuse_computing(monkeypatch):
    monkeypatch.setattr(stft_dataset, "read_waveform", refuse)  # __getitem__ would turn this into a skip
    monkeypatch.setattr(SpectrogramCache, "extend", refuse)


def cache_listing(dataset):
    """{file name: (size, mtime_ns, inode)} of the dataset's cache folder, lock file left out."""
    folder = dataset.cache.folder
    stats = {name: os.stat(os.path.join(folder, name)) for name in os.listdir(folder) if name != "lock"}
    return {name: (s.st_size, s.st_mtime_ns, s.st_ino) for name, s in stats.items()}


def shards(dataset):
    return sorted(name for name in os.listdir(dataset.cache.folder) if name.endswith(".f16"))


def set_mtime(path, seconds_later):
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds_later * 10**9))


# --- cached values -------------------------------------------------------------------------------


def test_cached_items_equal_uncached_items_up_to_float16(real_dir, tmp_path, monkeypatch):
    reference = items(SeismicSTFTDataset(real_dir))
    dataset = cached(real_dir, tmp_path / "cache", processes=2)  # computed by 2 processes, one shard each
    monkeypatch.setattr(stft_dataset, "read_waveform", refuse)
    result = items(dataset)
    assert_same_items(result, reference)
    assert any((x.float() != expected).any() for (x, _), (expected, _) in zip(result, reference))  # rounded
    assert shards(dataset) == ["shard_0.f16", "shard_1.f16"]
    sizes = [os.path.getsize(os.path.join(dataset.cache.folder, name)) for name in shards(dataset)]
    assert sizes == [2 * sum(x.numel() for x, _ in part) for part in (result[:4], result[4:])]


def test_reopening_up_to_date_cache_computes_nothing(real_dir, tmp_path, monkeypatch):
    first = cached(real_dir, tmp_path / "cache")
    expected, listing = items(first), cache_listing(first)
    refuse_computing(monkeypatch)
    second = cached(real_dir, tmp_path / "cache")
    for (x, meta), (y, expected_meta) in zip(items(second), expected, strict=True):
        assert torch.equal(x, y) and meta == expected_meta
    assert {k: v for k, v in cache_listing(second).items() if k != "settings.json"} == {
        k: v for k, v in listing.items() if k != "settings.json"
    }


def test_manifest_records_versions_and_positions(real_dir, tmp_path):
    dataset = cached(real_dir, tmp_path / "cache")
    with np.load(os.path.join(dataset.cache.folder, "manifest.npz")) as stored:
        manifest = {field: stored[field] for field in stored.files}
    assert set(manifest) == set(spectrogram_cache.MANIFEST_FIELDS) | {"version"}
    assert manifest["path"].tolist() == dataset.files.tolist()
    stats = [os.stat(os.path.join(real_dir, name)) for name in dataset.files]
    assert manifest["version"].tolist() == [[s.st_size, s.st_mtime_ns] for s in stats]
    sizes = 3 * 129 * manifest["n_time"].astype(np.int64)
    assert manifest["offset"].tolist() == np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()  # back to back
    assert set(manifest["shard"].tolist()) == {0} and set(manifest["skip_reason"].tolist()) == {""}


# --- what the key covers -------------------------------------------------------------------------


def test_other_nfft_uses_own_folder_and_shape(real_dir, tmp_path):
    default = cached(real_dir, tmp_path / "cache")
    listing = cache_listing(default)
    wide = cached(real_dir, tmp_path / "cache", stft=STFTConfig(nfft=512))
    assert wide.cache.folder != default.cache.folder and len(os.listdir(tmp_path / "cache")) == 2
    assert all(x.shape[:2] == (3, 257) for x, _ in items(wide))
    assert_same_items(items(wide), items(SeismicSTFTDataset(real_dir, stft=STFTConfig(nfft=512))))
    assert cache_listing(default) == listing


def test_each_data_dir_has_own_folder(real_dir, tmp_path):
    other_dir = copy_files(shipped_files(per_family=1), tmp_path / "other")
    first, second = cached(real_dir, tmp_path / "cache"), cached(other_dir, tmp_path / "cache")
    assert first.cache.folder != second.cache.folder
    assert_same_items(items(second), items(SeismicSTFTDataset(other_dir)))
    assert_same_items(items(first), items(SeismicSTFTDataset(real_dir)))


# --- new, changed and removed files --------------------------------------------------------------


def test_added_file_goes_to_new_shard_alone(real_dir, tmp_path, monkeypatch):
    first = cached(real_dir, tmp_path / "cache")
    shard_0 = cache_listing(first)["shard_0.f16"]
    added = shutil.copy(os.path.join(SHIPPED, EXTRA_HH), real_dir)
    read = count_waveform_reads(monkeypatch)
    dataset = cached(real_dir, tmp_path / "cache")
    assert read == [added]
    assert shards(dataset) == ["shard_0.f16", "shard_1.f16"] and cache_listing(dataset)["shard_0.f16"] == shard_0
    assert len(dataset) == 9
    assert_same_items(items(dataset), items(SeismicSTFTDataset(real_dir)))


def test_changed_file_is_recomputed_into_a_new_shard(real_dir, tmp_path, monkeypatch):
    cached(real_dir, tmp_path / "cache")
    changed = shutil.copy(os.path.join(SHIPPED, EXTRA_HH), real_dir)
    before = cached(real_dir, tmp_path / "cache")  # the changed file alone in shard_1
    assert shards(before) == ["shard_0.f16", "shard_1.f16"]
    shutil.copyfile(os.path.join(SHIPPED, EXTRA_BH), changed)  # other recording, same name
    set_mtime(changed, 1)
    read = count_waveform_reads(monkeypatch)
    dataset = cached(real_dir, tmp_path / "cache")
    assert read == [changed]
    assert shards(dataset) == ["shard_0.f16", "shard_1.f16", "shard_2.f16"]  # shard_1 kept for running readers
    assert 1 not in dataset.cache.manifest["shard"]
    assert_same_items(items(dataset), items(SeismicSTFTDataset(real_dir)))
    assert dataset[list(dataset.files).index(os.path.basename(changed))][1]["family"] == "BH"


def test_removed_file_is_left_out_without_recomputing(real_dir, tmp_path, monkeypatch):
    first = cached(real_dir, tmp_path / "cache")
    os.remove(os.path.join(real_dir, first.files[0]))
    refuse_computing(monkeypatch)
    dataset = cached(real_dir, tmp_path / "cache")
    assert len(dataset) == 7
    monkeypatch.undo()
    assert_same_items(items(dataset), items(SeismicSTFTDataset(real_dir)))


# --- files unusable on a full read ---------------------------------------------------------------


def test_unusable_file_is_recorded_and_not_read_again(real_dir, tmp_path, monkeypatch):
    path = nan_samples(real_dir)
    reference = items(SeismicSTFTDataset(real_dir))
    cached(real_dir, tmp_path / "cache", processes=2)
    refuse_computing(monkeypatch)
    dataset = cached(real_dir, tmp_path / "cache")
    assert_same_items(items(dataset), reference)
    row = dataset.cache.rows[list(dataset.files).index(os.path.basename(path))]
    assert dataset.cache.manifest["skip_reason"][row] == "NaN or infinite samples"
    assert dataset.cache.manifest["shard"][row] == -1
    batch = pad_collate(items(dataset))
    assert batch["spectrogram"].shape[0] == 8
    assert [(p, reason) for p, reason, _ in batch["skipped"]] == [(path, "NaN or infinite samples")]


def test_no_empty_shard_left_after_adding_unusable_file(real_dir, tmp_path):
    cached(real_dir, tmp_path / "cache")
    nan_samples(real_dir)
    dataset = cached(real_dir, tmp_path / "cache")
    referenced = {f"shard_{n}.f16" for n in dataset.cache.manifest["shard"].tolist() if n >= 0}
    assert shards(dataset) == sorted(referenced)


# --- interrupted builds --------------------------------------------------------------------------


def test_interrupted_build_leaves_no_manifest_and_next_open_completes(real_dir, tmp_path, monkeypatch):
    calls = []
    original = stft_dataset.read_waveform

    def interrupted_at_third_file(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(path, *args)

    monkeypatch.setattr(stft_dataset, "read_waveform", interrupted_at_third_file)
    with pytest.raises(KeyboardInterrupt):
        cached(real_dir, tmp_path / "cache")
    (folder,) = os.listdir(tmp_path / "cache")
    assert set(os.listdir(tmp_path / "cache" / folder)) <= {"lock", "settings.json"}  # no shard, tmp or manifest
    monkeypatch.undo()
    dataset = cached(real_dir, tmp_path / "cache")
    assert len(dataset.cache.manifest["path"]) == 8 and shards(dataset) == ["shard_0.f16"]
    assert_same_items(items(dataset), items(SeismicSTFTDataset(real_dir)))


# --- worker processes and pickling ---------------------------------------------------------------


def test_dataloader_workers_give_the_same_batches(real_dir, tmp_path):
    nan_samples(real_dir)
    dataset = cached(real_dir, tmp_path / "cache")
    dataset[0]  # a shard mapped in this process before the workers start
    loaders = [DataLoader(dataset, batch_size=3, collate_fn=pad_collate, num_workers=n) for n in (0, 2)]
    for serial, parallel in zip(*loaders, strict=True):
        assert torch.equal(serial["spectrogram"], parallel["spectrogram"])
        assert torch.equal(serial["mask"], parallel["mask"])
        assert serial["meta"] == parallel["meta"] and serial["skipped"] == parallel["skipped"]


def test_pickled_dataset_holds_no_shard_data(real_dir, tmp_path):
    dataset = cached(real_dir, tmp_path / "cache")
    expected = items(dataset)  # maps shard_0 in this process
    shard_size = os.path.getsize(os.path.join(dataset.cache.folder, "shard_0.f16"))
    pickled = pickle.dumps(dataset)
    assert len(pickled) < shard_size / 20
    for (x, meta), (y, expected_meta) in zip(items(pickle.loads(pickled)), expected, strict=True):
        assert torch.equal(x, y) and meta == expected_meta


def test_files_is_str_array_and_subset_with_index_array_loads(real_dir, tmp_path):
    dataset = cached(real_dir, tmp_path / "cache")
    assert isinstance(dataset.files, np.ndarray) and dataset.files.dtype.kind == "U"
    indices = np.array([6, 1, 3], dtype=np.int64)
    (batch,) = DataLoader(Subset(dataset, indices), batch_size=3, collate_fn=pad_collate)
    assert [os.path.basename(meta["path"]) for meta in batch["meta"]] == dataset.files[indices].tolist()
    assert batch["spectrogram"].shape[:3] == (3, 3, 129)


# --- parallel header indexing --------------------------------------------------------------------


def test_parallel_header_index_equals_serial(real_dir, tmp_path, monkeypatch):
    empty_file(real_dir)
    truncated_file(real_dir)
    pools = []

    class RecordedPool(file_index.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    serial = build_index(real_dir, index_path=str(tmp_path / "serial.npz"), processes=1)
    monkeypatch.setattr(file_index, "PARALLEL_INDEX_MIN_FILES", 0)
    monkeypatch.setattr(file_index, "ProcessPoolExecutor", RecordedPool)
    parallel = build_index(real_dir, index_path=str(tmp_path / "parallel.npz"), processes=2)
    assert pools == [(2,)]
    for field in dataclasses.fields(parallel):
        assert np.array_equal(getattr(parallel, field.name), getattr(serial, field.name)), field.name
    assert (parallel.error_reason != "").sum() == 2


# --- train.py ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_with_cache_dir_builds_then_reuses_cache(train_dir, tmp_path, monkeypatch):
    # --device cpu: the losses are compared at rel=1e-6, and CUDA's bilinear backward (atomic adds) is not
    # deterministic, so on a GPU machine --device auto would flake.
    argv = flags(
        data_dir=train_dir,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        num_epochs="1",
        batch_size="4",
        num_workers="0",
        checkpoint_dir=str(tmp_path / "checkpoints"),
        log_dir=str(tmp_path / "logs"),
    )
    first = train.main(argv)
    (folder,) = os.listdir(tmp_path / "cache")
    assert {"manifest.npz", "shard_0.f16"} <= set(os.listdir(tmp_path / "cache" / folder))
    assert math.isfinite(first["best_val_loss"]) and first["skipped"] == {}
    refuse_computing(monkeypatch)
    second = train.main(argv)
    assert second["skipped"] == {} and second["best_val_loss"] == pytest.approx(first["best_val_loss"], rel=1e-6)


def test_batches_from_the_cache_stay_float16_and_match_uncached_batches(real_dir, tmp_path):
    batch = pad_collate(items(cached(real_dir, tmp_path / "cache")))
    reference = pad_collate(items(SeismicSTFTDataset(real_dir)))
    assert batch["spectrogram"].dtype == torch.float16 and reference["spectrogram"].dtype == torch.float32
    assert torch.equal(batch["mask"], reference["mask"])
    assert (batch["spectrogram"].float() - reference["spectrogram"]).abs().max() <= FLOAT16_ROUNDING


def test_unwritable_cache_dir_is_a_clear_error(train_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            flags(
                data_dir=train_dir,
                cache_dir=str(blocker / "cache"),
                num_workers="0",
                checkpoint_dir=str(tmp_path / "checkpoints"),
                log_dir=str(tmp_path / "logs"),
            )
        )
    assert exit_info.value.code == 2
    assert "a_file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unreadable_manifest_is_rebuilt(real_dir, tmp_path):
    first = cached(real_dir, tmp_path / "cache")
    with open(os.path.join(first.cache.folder, "manifest.npz"), "wb") as f:
        f.write(b"truncated")
    dataset = cached(real_dir, tmp_path / "cache")
    assert len(dataset.cache.manifest["path"]) == 8
    assert_same_items(items(dataset), items(SeismicSTFTDataset(real_dir)))
