"""SeisBench datasets as --data_dir: written here with seisbench's WaveformDataWriter from the shipped recordings and
compared with the same recordings read as miniSEED files. Nothing downloads (test_nothing_is_fetched)."""

import os
import socket

import numpy as np
import obspy
import pandas as pd
import pytest
import torch
from conftest import SHIPPED, copy_files, shipped_files

import embed
import train
from embedding.poolings import encode_batch
from embedding.representation import regression_chance, regression_scores
from model import ConvAutoencoder
from reading.recordings import choose_val_groups
from reading.seisbench_data import UNKNOWN_FAMILY, is_seisbench_dataset, recording_of_file, write_dataset
from reading.transform import STFTConfig
from reading.waveforms import DEFAULT_FAMILIES, NO_SIGNAL, UnusableFile, read_waveform
from stft_dataset import SeismicSTFTDataset

NAMES = shipped_files(per_family=1)  # 4 real 90 s recordings: HH, HN, EH, BH
RESAMPLED = "BK.BDM.HN.20160903T060122.mseed"  # also written at 40 Hz: read back at 100 Hz by both paths


def shipped_traces(names=NAMES, **extra):
    """(metadata, components) of shipped recordings, with `extra` metadata columns on each."""
    return [({**metadata, **extra}, components) for metadata, components in map(recording_of_file, paths(names))]


def paths(names):
    return [os.path.join(SHIPPED, name) for name in names]


def at_40_hz(directory):
    """A shipped recording resampled to 40 Hz: written as a FLOAT64 miniSEED file, returned as a SeisBench trace."""
    stream = obspy.read(os.path.join(SHIPPED, RESAMPLED)).resample(40.0)
    path = os.path.join(directory, "BK.BDM.HN.40HZ.mseed")
    stream.write(path, format="MSEED", encoding="FLOAT64")
    metadata, components = recording_of_file(path)
    return {**metadata, "trace_name": "BK.BDM.HN.40HZ"}, components


def original_names(dataset):
    """{trace key: the name the trace was written with}: WaveformDataWriter renames the traces it packs in a bucket
    ("bucket0$1,:3,:9001") and keeps the name given in trace_name_original."""
    original = dataset.traces.column(dataset.traces.key, "trace_name_original")
    return {key: name if isinstance(name, str) else key for key, name in zip(dataset.traces.key, original)}


def by_trace(dataset):
    """{name written with: (spectrogram, meta)} of every sample of a dataset."""
    samples = dataset.__getitems__(list(range(len(dataset))))
    names = original_names(dataset)
    return {names[key]: sample for key, sample in zip(dataset.sample_files(np.arange(len(dataset))), samples)}


def by_file(dataset):
    """{file name without extension: (spectrogram, meta)} of every sample of a miniSEED dataset."""
    samples = dataset.__getitems__(list(range(len(dataset))))
    return {os.path.splitext(os.path.basename(meta["path"]))[0]: (x, meta) for x, meta in samples}


@pytest.fixture(scope="module")
def files_and_dataset(tmp_path_factory):
    """(miniSEED directory, SeisBench dataset) of the same 5 recordings (one at 40 Hz), in ENZ order."""
    base = tmp_path_factory.mktemp("pair")
    files = copy_files(NAMES, base / "files")
    traces = shipped_traces() + [at_40_hz(files)]
    return files, write_dataset(str(base / "dataset"), traces, component_order="ENZ")


@pytest.mark.parametrize("component_order", ["ZNE", "ENZ"])
def test_same_spectrograms_as_the_miniseed_files(files_and_dataset, tmp_path, component_order):
    files, _ = files_and_dataset
    traces = shipped_traces() + [at_40_hz(tmp_path)]
    dataset = SeismicSTFTDataset(write_dataset(str(tmp_path / "dataset"), traces, component_order=component_order))
    assert dataset.traces.rate.tolist() == [100.0] * 4 + [40.0]
    read, expected = by_trace(dataset), by_file(SeismicSTFTDataset(files))
    assert sorted(read) == sorted(expected) and len(read) == 5
    for name, (x, meta) in read.items():
        np.testing.assert_allclose(x.numpy(), expected[name][0].numpy(), atol=1e-6)
        assert x.shape == (3, 129, 142)  # channel 0 is E, 1 N, 2 Z whatever the stored order
        assert {k: meta[k] for k in ("trace_id", "family", "starttime")} == {
            k: expected[name][1][k] for k in ("trace_id", "family", "starttime")
        }
        assert meta["dataset"] == "dataset" and meta["trace_chunk"] == ""


def test_a_trace_holds_its_components_in_the_stored_order(tmp_path):
    """ENZ on disk, with N made dead: channel 1 (N) is zeros, E and Z are not."""
    (metadata, components), *_ = shipped_traces()
    components = {**components, "N": np.zeros_like(components["N"])}
    dataset = SeismicSTFTDataset(write_dataset(str(tmp_path / "d"), [(metadata, components)], component_order="ENZ"))
    x = dataset[0][0]
    assert torch.all(x[1] == 0) and x[0].std() > 0.05 and x[2].std() > 0.05


def test_windows_are_those_of_the_miniseed_files(files_and_dataset):
    files, dataset_dir = files_and_dataset
    windows = {"window_seconds": 30.0, "window_stride": 20.0}
    dataset, expected = SeismicSTFTDataset(dataset_dir, **windows), SeismicSTFTDataset(files, **windows)
    assert len(dataset) == len(expected) == 5 * 4
    key = lambda item: (item[1]["trace_id"], item[1]["starttime"])  # noqa: E731
    read = sorted(dataset.__getitems__(list(range(len(dataset)))), key=key)
    for (x, meta), (y, other) in zip(read, sorted(expected.__getitems__(list(range(len(expected)))), key=key)):
        assert key((x, meta)) == key((y, other))
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-6)


def test_chunked_dataset_names_each_trace_by_chunk_and_trace_name(tmp_path):
    root = str(tmp_path / "chunked")
    write_dataset(root, shipped_traces(NAMES[:2]), chunk="a")
    write_dataset(root, shipped_traces(NAMES[2:]), chunk="b")
    assert is_seisbench_dataset(root) and not os.path.exists(os.path.join(root, "metadata.csv"))
    dataset = SeismicSTFTDataset(root)
    assert sorted(dataset.files.tolist()) == ["a/bucket0$0,:3,:9001", "a/bucket0$1,:3,:9001"] + [
        "b/bucket0$0,:3,:9001",
        "b/bucket0$1,:3,:9001",
    ]
    samples = by_trace(dataset)
    assert sorted(samples) == sorted(os.path.splitext(name)[0] for name in NAMES)
    assert sorted(meta["trace_chunk"] for _, meta in samples.values()) == ["a", "a", "b", "b"]


def broken_traces():
    """Real recordings made unusable: NaN samples, all zeros, 1 s (under one STFT window), Z and N only."""
    traces = shipped_traces(NAMES[:4])
    nan, zeros, short, two = [(dict(metadata), dict(components)) for metadata, components in traces]
    nan[1]["Z"] = nan[1]["Z"].astype(float)
    nan[1]["Z"][100:200] = np.nan
    zeros[1].update({c: np.zeros_like(samples) for c, samples in zeros[1].items()})
    short[1].update({c: samples[:100] for c, samples in short[1].items()})
    del two[1]["E"]
    names = ["with_nan", "zeros", "short", "two_components"]  # "nan" would be read back as NaN by pandas
    broken = [nan, zeros, short, two]
    return [({**metadata, "trace_name": name}, components) for name, (metadata, components) in zip(names, broken)]


def test_broken_traces_are_skipped_with_their_name_and_reason(tmp_path):
    root = write_dataset(str(tmp_path / "broken"), shipped_traces(NAMES[:2]) + broken_traces())
    dataset = SeismicSTFTDataset(root)
    samples = dataset.__getitems__(list(range(len(dataset))))
    dataset.skips.add_batch([(m["path"], m["skip_reason"], m["message"]) for x, m in samples if x is None])
    summary = dataset.skips.summary()
    reasons = {"NaN or infinite samples": 1, NO_SIGNAL: 1, "too short for one STFT window": 1}
    assert summary["counts"] == {**reasons, "fewer than 3 components": 1}
    assert sum(x is not None for x, _ in samples) == 2
    by_name = {os.path.relpath(path, root): message for path, message in summary["files"].items()}
    by_original = {original_names(dataset)[name]: message for name, message in by_name.items()}
    assert sorted(by_original) == ["short", "two_components", "with_nan", "zeros"]  # named as in metadata.csv
    assert by_original["two_components"] == "fewer than 3 components: BK.MHC..BH?: 2 of 3 components (missing E)"
    assert by_original["with_nan"] == "NaN or infinite samples: AZ.KNW..HHZ"


def test_too_short_for_a_window_is_skipped_from_the_metadata(tmp_path):
    root = write_dataset(str(tmp_path / "short"), shipped_traces(NAMES[:1]) + broken_traces()[2:3])
    dataset = SeismicSTFTDataset(root, window_seconds=30.0)
    assert len(dataset) == 3 and dataset.skips.counts() == {"shorter than --window_seconds": 1}


def test_unrotated_horizontals_and_channel_families(tmp_path):
    """Z12 traces read as N = 1, E = 2; a family not asked for is counted apart; no trace_channel: kept."""
    (metadata, components), (other, more) = shipped_traces(NAMES[:2])
    unrotated = {"Z": components["Z"], "1": components["N"], "2": components["E"]}
    more = {"Z": more["Z"], "1": more["N"], "2": more["E"]}
    no_family = {key: value for key, value in other.items() if key != "trace_channel"}
    traces = [(metadata, unrotated), ({**other, "trace_channel": "LH"}, more), (no_family, more)]
    root = write_dataset(str(tmp_path / "z12"), traces, component_order="Z12")
    dataset = SeismicSTFTDataset(root, families=DEFAULT_FAMILIES)
    assert len(dataset) == 2 and dict(dataset.excluded) == {"LH": 1}
    assert dataset.recordings.family.tolist() == ["HH", UNKNOWN_FAMILY]
    plain = SeismicSTFTDataset(write_dataset(str(tmp_path / "zne"), [(metadata, components)]))
    np.testing.assert_array_equal(dataset[0][0].numpy(), plain[0][0].numpy())


def test_split_by_dataset_uses_the_split_column(tmp_path):
    splits = ["train", "train", "dev", "test"]
    traces = [({**m, "split": s}, c) for (m, c), s in zip(shipped_traces(), splits)]
    dataset = SeismicSTFTDataset(write_dataset(str(tmp_path / "split"), traces))
    keys, codes = dataset.groups("dataset")
    val_groups = choose_val_groups(keys, codes, 0.5, seed=1)
    assert val_groups == ["dev"]
    split_of = dict(zip(dataset.files, dataset.traces.column(dataset.files, "split")))
    assert [split_of[f] for f in dataset.sample_files(dataset.split_positions("val", "dataset", val_groups))] == ["dev"]
    train_side = dataset.sample_files(dataset.split_positions("train", "dataset", val_groups))
    assert sorted(split_of[f] for f in train_side) == ["train", "train"]  # test: on neither side
    files = SeismicSTFTDataset(copy_files(NAMES, tmp_path / "files"))
    assert choose_val_groups(*files.groups("dataset"), 0.5, seed=1) is None  # miniSEED files have no split column


@pytest.mark.parametrize("windows", [{}, {"window_seconds": 40.0, "window_stride": 40.0}])
def test_cache_names_traces_and_gives_the_same_spectrograms(files_and_dataset, tmp_path, windows):
    _, dataset_dir = files_and_dataset
    read = SeismicSTFTDataset(dataset_dir, **windows)
    cached = SeismicSTFTDataset(dataset_dir, cache_dir=str(tmp_path / "cache"), processes=1, **windows)
    again = SeismicSTFTDataset(dataset_dir, cache_dir=str(tmp_path / "cache"), processes=1, **windows)
    assert sorted(again.cache.manifest["path"].tolist()) == sorted(read.sample_key(i) for i in range(len(read)))
    for i in range(len(read)):
        (x, meta), (y, other) = read[i], again[i]
        np.testing.assert_allclose(x.numpy(), y.float().numpy(), atol=1e-3)  # float16 in the cache
        assert meta["trace_name"] == other["trace_name"] and other["dataset"] == "dataset"
    assert cached.cache.folder == again.cache.folder


def test_nothing_is_fetched(files_and_dataset, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    _, dataset_dir = files_and_dataset
    dataset = SeismicSTFTDataset(dataset_dir)
    assert all(x is not None for x, _ in dataset.__getitems__(list(range(len(dataset)))))


def test_regression_scores_of_a_perfect_and_an_uninformative_feature():
    rng = np.random.default_rng(0)
    values = rng.normal(size=200)
    assert regression_scores(values[:, None], values)["r2"] > 0.95
    noise = regression_scores(rng.normal(size=(200, 4)), values)
    assert noise["r2"] < 0.2 and noise["mae"] > 0.5
    chance = regression_chance(values)
    assert -0.02 < chance["r2"] < 0


def labelled_traces(directory):
    """8 shipped recordings, 2 of each family, as a SeisBench dataset with a split, a category and a numeric column."""
    traces = shipped_traces(shipped_files(per_family=2))
    splits = ["train", "dev", "train", "train", "dev", "train", "train", "test"]
    for k, ((metadata, _), split) in enumerate(zip(traces, splits)):
        category = "earthquake_local" if metadata["trace_channel"] in ("HH", "BH") else "noise"
        metadata.update(split=split, trace_category=category, source_magnitude=1.0 + 0.25 * k)
    return write_dataset(str(directory), traces)


@pytest.fixture(scope="module")
def trained_on_dataset(tmp_path_factory):
    """A 1-epoch run on a SeisBench dataset split by its split column: (checkpoint, dataset directory)."""
    base = tmp_path_factory.mktemp("dataset_run")
    data_dir = labelled_traces(base / "dataset")
    argv = ["--data_dir", data_dir, "--num_epochs", "1", "--batch_size", "4", "--num_workers", "0"]
    argv += ["--split_by", "dataset", "--checkpoint_dir", str(base / "checkpoints"), "--log_dir", str(base / "logs")]
    summary = train.main(argv + ["--device", "cpu"])
    return os.path.join(summary["run_dir"], "best_model.pt"), data_dir


@pytest.mark.slow
def test_train_on_a_dataset_validates_on_its_dev_split(trained_on_dataset):
    checkpoint, data_dir = trained_on_dataset
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["val_groups"] == ["dev"] and len(saved["val_files"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("column", ["trace_category", "source_magnitude"])
def test_embed_scores_a_metadata_column_and_the_catalogue_joins_the_metadata(trained_on_dataset, tmp_path, column):
    checkpoint, data_dir = trained_on_dataset
    out = tmp_path / "embeddings"
    argv = [checkpoint, "--data_dir", data_dir, "--output_dir", str(out), "--device", "cpu", "--labels", column]
    summary = embed.main(argv + ["--clusters", "2", "--num_anomalies", "0", "--projector_points", "0"])
    catalog = pd.read_csv(out / "catalog.csv", keep_default_na=False)
    metadata = pd.read_csv(os.path.join(data_dir, "metadata.csv"))
    joined = pd.merge(catalog, metadata, on="trace_name")
    assert len(joined) == len(catalog) == summary["rows"] == 8 and set(catalog["dataset"]) == {"dataset"}
    assert (joined["station"] == joined["station_code"]).all()
    scores = summary["labels"]["scores"]
    assert len(scores) == 3 and summary["labels"]["recordings"] == 8
    if column == "source_magnitude":
        assert summary["labels"]["numeric"] and all(np.isfinite(s["r2"]) and s["mae"] >= 0 for s in scores.values())
    else:
        assert summary["labels"]["counts"] == {"earthquake_local": 4, "noise": 4}


def test_a_file_of_zeros_is_skipped_as_the_trace_of_zeros_is(tmp_path):
    stream = obspy.read(os.path.join(SHIPPED, NAMES[0]))
    for trace in stream:
        trace.data[:] = 0
    path = str(tmp_path / "zeros.mseed")
    stream.write(path, format="MSEED")
    with pytest.raises(UnusableFile, match=f"^{NO_SIGNAL}: AZ.KNW..HH\\?: every component constant"):
        read_waveform(path, DEFAULT_FAMILIES, STFTConfig())


def test_same_embeddings_as_the_miniseed_files(files_and_dataset):
    """The default model (seeded weights) embeds a trace and its file alike: same spectrogram in, same vector out."""
    files, dataset_dir = files_and_dataset
    torch.manual_seed(0)
    model = ConvAutoencoder().eval()
    read, expected = by_trace(SeismicSTFTDataset(dataset_dir)), by_file(SeismicSTFTDataset(files))
    names = sorted(read)
    batch = {name: torch.stack([by[name][0] for name in names]) for name, by in (("traces", read), ("files", expected))}
    mask = torch.ones(len(names), batch["files"].shape[-1], dtype=torch.bool)
    vectors = {name: encode_batch(model, x, mask)[0] for name, x in batch.items()}
    np.testing.assert_allclose(vectors["traces"], vectors["files"], rtol=1e-5, atol=1e-6)
