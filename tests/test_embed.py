"""embed.py, similar.py and event_noise_windows.py on shipped real recordings, with a checkpoint trained here."""

import csv
import json
import os
import shutil

import numpy as np
import obspy
import pandas as pd
import pytest
import torch
from conftest import copy_files, shipped_files
from google.protobuf import text_format
from tensorboard.plugins.projector import projector_config_pb2
from waveform_files import KNW, first_seconds, real_stream, single_component, text_file, waveform_of, write

import embed
import event_noise_windows
import similar
from embedding.catalogue import CATALOG_COLUMNS, EmbeddingWriter
from embedding.figures import plot_map, sample_name
from embedding.poolings import POOLINGS
from embedding.readout import READOUT_DIM, READOUT_POOLING
from running.checkpoints import model_from_checkpoint
from stft_dataset import SeismicSTFTDataset


@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory):
    """embed.py on the 12 training files plus a 40 s cut and an unusable file: (summary, output_dir, data_dir)."""
    checkpoint, data_dir = trained
    mixed = tmp_path_factory.mktemp("mixed")
    shutil.copytree(data_dir, mixed / "waveforms")
    write(first_seconds(real_stream(KNW), 40), mixed / "waveforms", "cut40.mseed")
    single_component(mixed / "waveforms")
    out = mixed / "embeddings"
    argv = [checkpoint, "--data_dir", str(mixed / "waveforms"), "--output_dir", str(out), "--device", "cpu"]
    summary = embed.main(argv + ["--batch_size", "5", "--projector_points", "6", "--num_anomalies", "2"])
    return summary, out, str(mixed / "waveforms")


def rerun(embedded, trained, out, *extra):
    _, _, data_dir = embedded
    argv = [trained[0], "--data_dir", data_dir, "--output_dir", str(out), "--device", "cpu", "--num_anomalies", "0"]
    return embed.main(argv + ["--clusters", "2", *extra])  # K given: no search over K where a test needs none


def test_catalog_rows_match_the_embeddings_and_the_model(embedded, trained):
    summary, out, data_dir = embedded
    catalog = pd.read_csv(out / "catalog.csv", keep_default_na=False)
    embeddings = np.load(out / "embeddings.npy")
    assert list(catalog.columns) == list(CATALOG_COLUMNS) and len(catalog) == len(embeddings) == summary["rows"] == 13
    assert embeddings.dtype == np.float16 and embeddings.shape[1] == summary["dim"] == READOUT_DIM  # the read-out
    model = model_from_checkpoint(torch.load(trained[0], weights_only=True)).eval()
    pooled = POOLINGS[READOUT_POOLING]
    dataset = SeismicSTFTDataset(data_dir, index_path=out.parent / "index.json")
    position = {f: i for i, f in enumerate(dataset.files)}
    for row, path in enumerate(catalog["path"]):
        x = dataset[position[path]][0][None]
        with torch.no_grad():
            latent = model.encode(x)  # (1, 256, 9, T/16)
            expected_mse = float(((model(x) - x) ** 2).mean())
            band = latent[:, :, : model.readout.rows]  # the rows below readout.READOUT_MAX_HZ
            expected = model.readout(pooled(band))[0].numpy()  # whitened principal components of the pooled band
        # float16 keeps 11 significant bits: a relative error of at most 2^-11
        np.testing.assert_allclose(embeddings[row], expected, rtol=2**-11, atol=2e-3)
        assert catalog["mse"][row] == pytest.approx(expected_mse, rel=1e-4)
        assert catalog["duration_s"][row] == (40.01 if path == "cut40.mseed" else 90.01)  # samples / sampling rate
    first = catalog.iloc[0]
    assert first["trace_id"] == f"{first['network']}.{first['station']}.{first['location']}.{first['family']}?"
    assert pd.Timestamp(first["starttime"]).tzinfo is not None  # ISO 8601 with its zone
    assert sorted(catalog["anomaly_rank"]) == list(range(1, 14))
    ratio = catalog["mse"] / catalog["mse_time_mean"]
    assert catalog["path"][ratio.idxmax()] == catalog["path"][catalog["anomaly_rank"].idxmin()]
    with open(out / "embedding.json") as f:
        assert json.load(f)["skipped"]["counts"] == {"fewer than 3 components": 1}


def test_clusters_json_and_figures(embedded):
    _, out, _ = embedded
    with open(out / "clusters.json") as f:
        clusters = json.load(f)
    catalog = pd.read_csv(out / "catalog.csv", keep_default_na=False)
    floor = clusters["size_floor"]
    tried, sizes = set(clusters["silhouette_by_k"]), [c["size"] for c in clusters["clusters"]]
    if clusters["k_chosen_by"].startswith("highest silhouette"):  # every row is in the fitted sample here
        assert tried and tried <= {str(k) for k in range(2, 13) if k * floor <= len(catalog)} and min(sizes) >= floor
    else:  # too few recordings for two clusters of the floor: two clusters, said so
        assert clusters["k_chosen_by"].startswith("K = 2: no K") and tried == {"2"} and clusters["k"] == 2
    assert clusters["k"] == int(max(clusters["silhouette_by_k"], key=clusters["silhouette_by_k"].get))
    assert [c["size"] for c in clusters["clusters"]] == np.bincount(
        catalog["cluster"], minlength=clusters["k"]
    ).tolist()
    for c in clusters["clusters"]:
        members = catalog[catalog["cluster"] == c["cluster"]]
        assert c["nearest"][0] == members.loc[members["cluster_distance"].idxmin(), "path"]
        assert os.path.getsize(out / f"cluster_{c['cluster']}.png") > 5_000
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert "map.png" in pngs and len([p for p in pngs if p.startswith("anomaly_")]) == 2
    assert "clusters_over_time.png" in pngs  # the shipped files span years


@pytest.mark.slow
def test_clustering_is_reproducible_and_k_can_be_given(embedded, trained, tmp_path):
    _, out, _ = embedded
    rerun(embedded, trained, tmp_path / "again", "--projector_points", "0", "--clusters", "auto")
    first, again = (pd.read_csv(d / "catalog.csv", keep_default_na=False) for d in (out, tmp_path / "again"))
    assert first["cluster"].tolist() == again["cluster"].tolist()
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(tmp_path / "again" / "embeddings.npy"))
    rerun(embedded, trained, tmp_path / "k3", "--clusters", "3", "--projector_points", "0")
    with open(tmp_path / "k3" / "clusters.json") as f:
        assert json.load(f)["k"] == 3
    assert not (tmp_path / "again" / "projector").exists()


def test_projector_is_read_back_by_tensorboards_plugin_config(embedded):
    _, out, _ = embedded
    config = projector_config_pb2.ProjectorConfig()
    with open(out / "projector" / "projector_config.pbtxt") as f:
        text_format.Parse(f.read(), config)
    (entry,) = config.embeddings
    base = out / "projector"
    tensors = np.loadtxt(base / entry.tensor_path, delimiter="\t", ndmin=2)
    with open(base / entry.metadata_path) as f:
        metadata = list(csv.reader(f, delimiter="\t"))
    assert metadata[0] == list(CATALOG_COLUMNS) and len(metadata) - 1 == len(tensors) == 6
    catalog = pd.read_csv(out / "catalog.csv", keep_default_na=False, dtype=str)
    embeddings = np.load(out / "embeddings.npy")
    for values, vector in zip(metadata[1:], tensors):
        row = catalog.index[catalog["path"] == values[0]][0]
        assert values == catalog.iloc[row].tolist()
        np.testing.assert_allclose(vector, embeddings[row], rtol=1e-5, atol=1e-6)
    assert entry.sprite.single_image_dim == [32, 32] and os.path.exists(base / entry.sprite.image_path)


def test_similar_finds_the_recording_itself_at_distance_zero(embedded, tmp_path, capsys):
    _, out, data_dir = embedded
    catalog = pd.read_csv(out / "catalog.csv", keep_default_na=False)
    query = shutil.copy(os.path.join(data_dir, catalog["path"][4]), tmp_path / "query.mseed")
    found = similar.main([str(out), str(query), "-k", "3", "--device", "cpu"])
    # itself, up to rounding (encoded alone here in float32, stored by embed.py as float16; standardising scales it up)
    assert found[0]["row"] == 4 and found[0]["distance"] < 1e-2 * found[1]["distance"] and len(found) == 3
    assert found[1]["distance"] > 0.1
    listed = similar.main([str(out), "4", "-k", "3", "--output", str(tmp_path / "s.png")])
    assert [n["row"] for n in listed] == [n["row"] for n in found[1:]] + [listed[-1]["row"]]
    assert os.path.getsize(tmp_path / "s.png") > 5_000 and "catalogue row 4" in capsys.readouterr().out
    by_path = similar.main([str(out), catalog["path"][4], "-k", "2", "--output", str(tmp_path / "p.png")])
    assert [n["row"] for n in by_path] == [n["row"] for n in listed[:2]]


@pytest.mark.slow
def test_labels_by_column_and_by_csv(embedded, trained, tmp_path):
    summary = rerun(embedded, trained, tmp_path / "family", "--labels", "family", "--projector_points", "0")
    scores = summary["labels"]["scores"]
    assert list(scores) == ["model (readout)", "flattened spectrogram, PCA", "time-mean spectrum"]
    assert [s["dim"] for s in scores.values()] == [READOUT_DIM, 13, 13]  # baselines: PCA to 64 values, 13 rows
    assert all(0 <= s["knn_accuracy"] <= 1 and 0 <= s["precision_at_k"] <= 1 for s in scores.values())
    assert summary["labels"]["counts"] == {"BH": 3, "EH": 3, "HH": 4, "HN": 3}
    assert summary["labels"]["chance"] == pytest.approx({"knn_accuracy": 4 / 13, "precision_at_k": 30 / 156})
    labels = tmp_path / "labels.csv"
    _, out, _ = embedded
    paths = pd.read_csv(out / "catalog.csv", keep_default_na=False)["path"].tolist()
    labels.write_text("path,label\n" + "".join(f"{p},{'ab'[i % 2]}\n" for i, p in enumerate(paths[:8])) + "gone,a\n")
    summary = rerun(embedded, trained, tmp_path / "csv", "--labels", str(labels), "--projector_points", "0")
    assert summary["labels"]["recordings"] == 8 and summary["labels"]["counts"] == {"a": 4, "b": 4}


def test_event_noise_windows_from_real_files(tmp_path, capsys):
    data = copy_files(shipped_files(("HH", "DP"), per_family=2), tmp_path / "events")
    text_file(data)  # not miniSEED: skipped with its reason
    rows = event_noise_windows.main(["--data_dir", data, "--output_dir", str(tmp_path / "windows")])
    assert len(rows) == 8 and [r["label"] for r in rows[:4]] == ["noise", "noise", "event", "event"]
    assert "left out by --channels: 2 files; skipped files: 1 not readable as miniSEED" in capsys.readouterr().out
    assert rows[2]["path"].endswith(".30-40s.mseed") and rows[2]["source"] == shipped_files(("HH",), 1)[0]
    dataset = SeismicSTFTDataset(str(tmp_path / "windows"), index_path=tmp_path / "index.json")
    assert len(dataset) == 8 and set(dataset.time_bins().tolist()) == {17}  # 10 s: 1,000 samples
    event = waveform_of(os.path.join(tmp_path, "windows", rows[2]["path"]))  # (3, 1000): 30 s to 40 s
    np.testing.assert_array_equal(event, waveform_of(os.path.join(data, rows[2]["source"]))[:, 3000:4000])
    # the window file read whole is the spectrogram a run with 10 s windows every 5 s cuts from the source file
    cut = SeismicSTFTDataset(data, window_seconds=10.0, window_stride=5.0, index_path=tmp_path / "cut.json")
    window_start = obspy.read(os.path.join(tmp_path, "windows", rows[2]["path"]))[0].stats.starttime
    (windowed,) = [
        x for x, meta in map(cut.__getitem__, range(len(cut))) if obspy.UTCDateTime(meta["starttime"]) == window_start
    ]
    (whole,) = [x for x, meta in map(dataset.__getitem__, range(8)) if meta["path"].endswith(rows[2]["path"])]
    np.testing.assert_array_equal(windowed.numpy(), whole.numpy())
    with open(tmp_path / "windows" / "labels.csv") as f:
        assert list(csv.DictReader(f)) == rows
    with open(tmp_path / "windows" / "labels_clear.csv") as f:
        assert list(csv.DictReader(f)) == [r for r in rows if r["label"] == "noise" or float(r["snr"]) >= 2]
    noise = [float(r["snr"]) for r in rows if r["label"] == "noise"]
    assert all(0.5 < snr < 2**0.5 for snr in noise)  # each noise window over both together


def test_event_windows_that_show_no_event_are_not_clear(tmp_path, capsys):
    """A real event file whose 25-90 s (its P arrives at 29 s) are overwritten by its own noise of 5-25 s: its event
    windows' snr is below 2, and labels_clear.csv leaves them out; the untouched file's stand far above its noise."""
    stream = real_stream()
    for trace in stream:
        for begin in range(2500, 9001, 2000):
            trace.data[begin : begin + 2000] = trace.data[500 : 500 + min(2000, 9001 - begin)]
    data = str(tmp_path / "events")
    os.makedirs(data)
    write(stream, data, "AZ.KNW.HH.20120808T165050.no_event.mseed")
    write(real_stream(), data, KNW)
    rows = event_noise_windows.main(["--data_dir", data, "--output_dir", str(tmp_path / "windows")])
    snr = {(r["source"], r["path"][-12:-6]): float(r["snr"]) for r in rows if r["label"] == "event"}
    assert all(snr["AZ.KNW.HH.20120808T165050.no_event.mseed", w] < 2 for w in ("30-40s", "40-50s"))
    assert snr[KNW, "30-40s"] > 100 and snr[KNW, "40-50s"] > 100  # a M 3-4 event at 30 s
    with open(tmp_path / "windows" / "labels_clear.csv") as f:
        clear = [r["path"] for r in csv.DictReader(f)]
    assert len(clear) == 6 and not any("no_event" in p and p.startswith("event") for p in clear)
    assert "event windows with snr < 2 (2-10 Hz), not in labels_clear.csv: 2 of 4" in capsys.readouterr().out


def test_snr_is_nan_where_the_sampling_rate_leaves_no_band():
    vertical = real_stream().select(component="Z")
    vertical[0].decimate(25, no_filter=True)  # 4 Hz: nothing above 1.8 Hz, below the 2-10 Hz band
    snr = event_noise_windows.signal_to_noise(vertical, vertical[0].stats.starttime)
    assert len(snr) == 4 and all(np.isnan(v) for v in snr.values())


def test_event_noise_windows_skip_a_file_shorter_than_the_windows(tmp_path, capsys):
    data = copy_files(shipped_files(("HH",), per_family=1), tmp_path / "events")
    obspy.read().write(os.path.join(data, "BW.RJOB.EH.mseed"), format="MSEED")  # obspy's real example: 30 s
    rows = event_noise_windows.main(["--data_dir", data, "--output_dir", str(tmp_path / "windows")])
    assert len(rows) == 4 and not any("RJOB" in row["path"] for row in rows)
    assert "skipped files: 1 too short for the windows" in capsys.readouterr().out


def test_embedding_writer_streams_rows(tmp_path):
    writer = EmbeddingWriter(str(tmp_path / "e.npy"))
    parts = [np.random.default_rng(k).normal(size=(n, 7)).astype(np.float32) for k, n in enumerate((3, 1, 5))]
    for part in parts:
        writer.append(part)
    writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), np.concatenate(parts).astype(np.float16))
    assert os.listdir(tmp_path) == ["e.npy"]


@pytest.mark.slow
def test_rerun_into_the_same_directory_replaces_the_outputs(embedded, trained, tmp_path):
    out = tmp_path / "out"
    rerun(embedded, trained, out, "--num_anomalies", "3", "--projector_points", "4", "--clusters", "4")
    rerun(embedded, trained, out, "--num_anomalies", "1", "--projector_points", "0")
    names = sorted(os.listdir(out))
    assert len([n for n in names if n.startswith("anomaly_")]) == 1 and "projector" not in names
    assert [n for n in names if n.startswith("cluster_")] == ["cluster_0.png", "cluster_1.png"]
    assert not [n for n in names if "tmp" in n or n.endswith(".rows")]


def expect_error(capsys, function, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        function(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "error: " in err.splitlines()[-1] and words in err.splitlines()[-1], err  # argparse adds a usage line


def test_errors_are_one_line(embedded, trained, tmp_path, capsys):
    checkpoint, data_dir = trained
    _, out, _ = embedded
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    (tmp_path / "empty").mkdir()
    run = embed.main
    base = ["--output_dir", str(tmp_path / "e")]
    expect_error(capsys, run, [str(foreign), *base], "not a checkpoint of this project")
    expect_error(capsys, run, [checkpoint, "--data_dir", str(tmp_path / "empty"), *base], "no usable files")
    expect_error(capsys, run, [checkpoint, "--clusters", "1", *base], "must be an integer >= 2 or 'auto'")
    expect_error(capsys, run, [checkpoint, "--labels", "colour", *base], "neither a catalogue column")
    expect_error(capsys, run, [checkpoint, "--clusters", "99", *base], "more clusters than the")
    broken = single_component(tmp_path)
    expect_error(capsys, similar.main, [str(out), broken], "fewer than 3 components")
    expect_error(capsys, similar.main, [str(out), str(tmp_path / "nothing.mseed")], "neither a catalogue row")
    expect_error(capsys, similar.main, [str(tmp_path), "0"], "holds no outputs of embed.py")
    expect_error(capsys, similar.main, [str(out), "99"], "the catalogue has 13 rows")


def test_figure_names_keep_an_sds_day_and_a_window_start():
    assert sample_name("data/BK.BDM.HH.20120808T165050.mseed") == "BK.BDM.HH.20120808T165050"
    day = "2020/XX/S000/HHE.D/XX.S000..HHE.D.2020.001"  # an SDS day file: its extension is its day
    assert sample_name(day) == "XX.S000..HHE.D.2020.001"
    assert sample_name(day, "2020-01-01T06:55:14.000000Z") == "XX.S000..HHE.D.2020.001_20200101T065514"


def test_map_draws_the_smallest_groups_on_top(embedded):
    """A rare family (the shipped data's 14 BH recordings among 163 were hidden) is drawn above the others; the legend
    keeps its order."""
    catalog = pd.read_csv(embedded[1] / "catalog.csv", keep_default_na=False)
    families = catalog.family.to_numpy(dtype=str)
    figure = plot_map(catalog[["map_x", "map_y"]].to_numpy(), {"family": families})
    (ax,) = figure.axes
    values, counts = np.unique(families, return_counts=True)
    layers = {c.get_label().split()[0]: c.get_zorder() for c in ax.collections if not c.get_label().startswith("_")}
    assert list(layers) == values.tolist() and len(values) > 1
    count = dict(zip(values.tolist(), counts.tolist()))
    assert all(layers[a] > layers[b] for a in count for b in count if count[a] < count[b])
    assert len(set(layers.values())) == len(values)  # one layer each, ties drawn in the legend's order
