"""measuring/cluster_methods.py: each method on three separated blobs, with and without two far outliers; the
results file written from an embed output folder."""

import csv
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_mutual_info_score

from embedding.representation import reduce, size_floor
from measuring.cluster_methods import METHODS, main, recording_key

BLOB_ROWS, CENTRES, DIMS = 60, (0.0, 6.0, 12.0), 4
UNFLOORED = ("GaussianMixture full, BIC", "GaussianMixture diag, BIC", "k-means, silhouette (old)")


def blobs(outliers):
    """(features (3 x 60 + outliers, DIMS) float32, blob of each row, -1 for the outliers)."""
    rng = np.random.default_rng(0)
    rows = [rng.normal(centre, 0.5, size=(BLOB_ROWS, DIMS)) for centre in CENTRES]
    far = [np.full((1, DIMS), 60.0 * (-1) ** i) for i in range(outliers)]  # ~10 blob spacings away, either side
    truth = np.concatenate([np.repeat(np.arange(len(CENTRES)), BLOB_ROWS), np.full(outliers, -1)])
    return np.concatenate(rows + far).astype(np.float32), truth


def run(method, features):
    _, reduced = reduce(features, 0)
    return METHODS[method](reduced, 0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_finds_the_three_blobs(method):
    features, truth = blobs(outliers=0)
    labels, outside, _ = run(method, features)
    assert outside == 0 and adjusted_mutual_info_score(truth, labels) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["HDBSCAN, noise apart", "HDBSCAN min_samples 1"])
def test_hdbscan_marks_the_outliers_as_noise(method):
    features, truth = blobs(outliers=2)
    labels, outside, _ = run(method, features)
    assert outside == 2 and (labels[truth < 0] == -1).all()
    assert adjusted_mutual_info_score(truth[truth >= 0], labels[truth >= 0]) == pytest.approx(1.0)


def test_kmeans_floor_keeps_three_clusters_over_the_floor():
    features, truth = blobs(outliers=2)
    labels, outside, _ = run("k-means, size floor (now)", features)
    sizes = np.bincount(labels)
    assert len(sizes) == 3 and sizes.min() >= size_floor(len(features)) and outside == 2
    assert adjusted_mutual_info_score(truth[truth >= 0], labels[truth >= 0]) == pytest.approx(1.0)


@pytest.mark.parametrize("method", UNFLOORED)
def test_without_a_floor_each_outlier_is_a_cluster_of_its_own(method):
    features, truth = blobs(outliers=2)
    labels, _, _ = run(method, features)
    assert len(np.unique(labels)) == 5 and len(np.unique(labels[truth < 0])) == 2
    assert (np.bincount(labels)[labels[truth < 0]] == 1).all()


def test_recording_key_joins_the_channel_files_of_one_recording():
    east = "waveforms/1/AV.SPBG..BHE__20140910T192005Z__20140910T192305Z.mseed"
    assert recording_key(east) == recording_key(east.replace("BHE", "BHZ")) != recording_key(east.replace("1/", "2/"))
    assert recording_key("AZ.KNW.HH.20120808T165050.mseed") == "AZ.KNW.HH.20120808T165050.mseed"


def embed_folder(directory, features):
    """An embed output folder: embeddings.npy, catalog.parquet (per-channel E files), embedding.json."""
    os.makedirs(directory)
    np.save(os.path.join(directory, "embeddings.npy"), features.astype(np.float16))
    paths = [f"{i}/XX.S{i:03d}..HHE__20200101T000000Z__20200101T000300Z.mseed" for i in range(len(features))]
    networks = ["XX" if i % 2 else "YY" for i in range(len(features))]
    rates = [100.0] * len(features)  # one rate: its AMI with any clustering is 0
    table = pa.table({"path": paths, "network": networks, "family": ["HH"] * len(features), "sampling_rate": rates})
    pq.write_table(table, os.path.join(directory, "catalog.parquet"))
    described = {"checkpoint": "x.pt", "split": "all", "window_seconds": None, "data_dir": "/data/waveforms"}
    with open(os.path.join(directory, "embedding.json"), "w") as f:
        json.dump(described, f)
    return paths


def test_results_file_has_a_table_of_every_method(tmp_path):
    features, truth = blobs(outliers=2)
    paths = embed_folder(tmp_path / "embed", features)
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as f:  # labelled through the Z file, relative to the archive's parent
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([f"waveforms/{p.replace('HHE', 'HHZ')}", blob] for p, blob in zip(paths[:100], truth))
    flags = ["--labels", str(labels_csv), "--labels_root", "/data", "--results_dir", str(tmp_path / "results")]
    path = main([str(tmp_path / "embed"), *flags])
    text = open(path).read()
    assert os.path.dirname(path) == str(tmp_path / "results") and "cluster-methods" in path
    assert "100 of 182 rows labelled" in text
    hdbscan = next(line for line in text.splitlines() if line.startswith("| HDBSCAN"))
    cells = [cell.strip() for cell in hdbscan.strip("|").split("|")]
    assert cells[1:6] == ["3", "60", "60", "2", "0"] and cells[10] == "1.000"  # AMI with the labels
    assert cells[9] in ("0.000", "-0.000")  # with the sampling rate, one rate in all


def test_without_labels_every_row_of_the_table_has_every_column(tmp_path):
    features, _ = blobs(outliers=2)
    embed_folder(tmp_path / "embed", features)
    text = open(main([str(tmp_path / "embed"), "--results_dir", str(tmp_path / "results")])).read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(METHODS) and len({line.count("|") for line in rows}) == 1
    assert "no --labels" in text and all(line.split("|")[-3].strip() == "-" for line in rows[1:])
