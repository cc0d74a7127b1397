"""embed.py and inference.py at archive scale: torchrun shares (2 CPU processes, gloo) give the outputs of one
process; float16 storage against float32 on the shipped recordings; clusters fitted on a sample and assigned in
chunks; the catalogue as Parquet. Real shipped recordings throughout."""

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, SHIPPED, SearchIndex, copy_files, shipped_files
from torch.utils.data import DataLoader

import embed
import inference
import train
from embedding import catalogue, representation
from embedding.catalogue import STORED_DTYPE
from embedding.poolings import encode_batch
from embedding.readout import READOUT_DIM
from embedding.representation import cluster, label_scores, leave_one_out_neighbours, reduce, standardised
from reading.batching import LengthBatchSampler
from running import distributed as shards
from running.checkpoints import data_settings, model_from_checkpoint
from stft_dataset import SeismicSTFTDataset, pad_collate

PROCESSES = 2
EMBED_FLAGS = ["--window_seconds", "30", "--batch_size", "5", "--clusters", "auto", "--labels", "station"]
EMBED_FLAGS += ["--projector_points", "6", "--num_anomalies", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch run on 12 real files: (checkpoint path, data_dir)."""
    base = tmp_path_factory.mktemp("run")
    data_dir = copy_files(shipped_files(per_family=3), base / "waveforms")
    argv = ["--data_dir", data_dir, "--num_epochs", "1", "--batch_size", "4", "--num_workers", "0"]
    argv += ["--checkpoint_dir", str(base / "checkpoints"), "--log_dir", str(base / "logs")]
    summary = train.main(argv)
    return os.path.join(summary["run_dir"], "best_model.pt"), data_dir


def torchrun(script, *argv):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES)]
    result = subprocess.run([*command, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"torchrun exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def one_and_two(trained, tmp_path_factory):
    """embed.py on 16 real files cut in 30 s windows (48 rows), in one process and under torchrun in two."""
    checkpoint, _ = trained
    base = tmp_path_factory.mktemp("shares")
    data_dir = copy_files(shipped_files(per_family=4), base / "waveforms")
    argv = [checkpoint, "--data_dir", data_dir, *EMBED_FLAGS]
    embed.main([*argv, "--output_dir", str(base / "one")])
    torchrun("embed.py", *argv, "--output_dir", str(base / "two"))
    return base / "one", base / "two"


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_torchrun_embeddings_equal_one_process(one_and_two):
    one, two = one_and_two
    first, second = np.load(one / "embeddings.npy"), np.load(two / "embeddings.npy")
    assert first.dtype == second.dtype == np.float16 and first.shape == second.shape == (48, READOUT_DIM)
    # Same rows in the same order; identical on this machine, but a last float32 bit may differ where a process's
    # batch boundaries differ (batch 5 of 48 rows against 5 of 24), and float16 may round it either way.
    np.testing.assert_allclose(first.astype(np.float32), second.astype(np.float32), rtol=2**-10, atol=1e-7)
    assert read_json(one / "embedding.json")["processes"] == 1 and read_json(two / "embedding.json")["processes"] == 2
    assert not [name for name in os.listdir(two) if name.endswith(".rows") or "tmp" in name]


@pytest.mark.slow
def test_torchrun_catalogue_clusters_and_label_scores_equal_one_process(one_and_two):
    one, two = one_and_two
    first, second = (pd.read_csv(d / "catalog.csv", keep_default_na=False) for d in (one, two))
    text = ["path", "trace_id", "starttime", "duration_s", "cluster", "anomaly_rank"]
    assert first[text].equals(second[text])
    # PCA and KMeans sums run on 2 BLAS threads in one process, on 1 under torchrun: 3e-7 relative measured
    for column in ("mse", "mse_time_mean", "cluster_distance", "map_x", "map_y"):
        np.testing.assert_allclose(first[column], second[column], rtol=1e-5, atol=1e-4)
    clusters = [read_json(d / "clusters.json") for d in (one, two)]
    assert [c["nearest"] for c in clusters[0]["clusters"]] == [c["nearest"] for c in clusters[1]["clusters"]]
    assert clusters[0]["k"] == clusters[1]["k"] and clusters[0]["silhouette"] == pytest.approx(
        clusters[1]["silhouette"], rel=1e-4
    )
    labels = [read_json(d / "labels.json") for d in (one, two)]
    assert labels[0]["counts"] == labels[1]["counts"] and list(labels[0]["scores"]) == list(labels[1]["scores"])
    for who, scores in labels[0]["scores"].items():
        assert labels[1]["scores"][who] == pytest.approx(scores, rel=1e-4)  # float32 sums over 1 or 2 BLAS threads
    projected = [one / "projector" / "00000" / "embeddings", two / "projector" / "00000" / "embeddings"]
    shown = [pd.read_csv(d / "metadata.tsv", sep="\t", keep_default_na=False)[text] for d in projected]
    assert len(shown[0]) == 6 and shown[0].equals(shown[1])  # the same 6 recordings
    tensors = [np.loadtxt(d / "tensors.tsv", delimiter="\t") for d in projected]
    np.testing.assert_allclose(tensors[0], tensors[1], rtol=2**-10, atol=1e-7)


@pytest.mark.slow
def test_torchrun_inference_metrics_equal_one_process(trained, tmp_path):
    checkpoint, data_dir = trained
    argv = [checkpoint, "--split", "all", "--num_samples", "0", "--num_plots", "2", "--batch_size", "5"]
    argv += ["--device", "cpu"]
    one = inference.main([*argv, "--output_dir", str(tmp_path / "one")])
    torchrun("inference.py", *argv, "--output_dir", str(tmp_path / "two"))
    two = read_json(tmp_path / "two" / "metrics.json")
    assert one["processes"] == 1 and two["processes"] == 2 and two["num_samples"] == one["num_samples"] == 12
    assert [s["path"] for s in two["samples"]] == [s["path"] for s in one["samples"]]
    for a, b in zip(one["samples"], two["samples"]):
        for who in ("model", "baseline", "blur"):
            assert b[who]["mse"] == pytest.approx(a[who]["mse"], rel=1e-5)
            assert b[who]["mae"] == pytest.approx(a[who]["mae"], rel=1e-5)
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two"))


def test_shares_join_to_the_order_of_one_process(monkeypatch):
    lengths = np.array([5, 3, 5, 4, 3, 5, 4, 4, 3, 5, 5])
    positions = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]  # 9 left out (another split)
    order = shards.planned_order(lengths, 2, positions)
    for world_size in (1, 2, 3, 4):
        joined = []
        for rank in range(world_size):
            monkeypatch.setattr(shards, "rank_and_world_size", lambda rank=rank: (rank, world_size))
            share = shards.own_share(order)
            assert shards.planned_order(lengths, 2, share).tolist() == share.tolist()  # read in its own planned order
            joined += share.tolist()
        assert joined == order.tolist() == [1, 4, 8, 3, 6, 7, 0, 2, 5, 10]


def test_clusters_fitted_on_a_sample_and_assigned_in_chunks(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=5, size=(3, 40))
    np.save(tmp_path / "e.npy", (centres[rng.integers(0, 3, 900)] + rng.normal(size=(900, 40))).astype(np.float16))
    embeddings = np.load(tmp_path / "e.npy", mmap_mode="r")  # assign reads it in chunks of plain file reads
    monkeypatch.setattr(representation, "FIT_SAMPLE", 300)
    pipeline, reduced = reduce(embeddings, seed=0)
    assert len(reduced) == 300
    kmeans, description = cluster(reduced, "auto", seed=0)
    assert description["k"] == 3 and description["fitted_on"] == 300
    monkeypatch.setattr(embed, "ASSIGN_CHUNK", 64)
    ratios = rng.choice(np.float32([0.5, 1.0, 2.0, -np.inf]), 900)  # ties everywhere, across chunks
    blocks = list(embed.cluster_columns(pipeline, kmeans, embeddings, ratios))
    assert [len(block["cluster"]) for block in blocks] == [64] * 14 + [4]  # never a column of N at once
    columns = {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    whole = pipeline.transform(embeddings.astype(np.float32))
    labels = columns["cluster"]
    np.testing.assert_array_equal(labels, kmeans.predict(whole))
    distances = np.linalg.norm(whole - kmeans.cluster_centers_[labels], axis=1)
    np.testing.assert_allclose(columns["cluster_distance"], distances, rtol=1e-5)
    np.testing.assert_allclose(columns["map_x"], whole[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(columns["map_y"], whole[:, 1], rtol=1e-5, atol=1e-5)
    expected = np.empty(900, dtype=np.int64)  # what a stable argsort of all N gives
    expected[np.argsort(-ratios, kind="stable")] = np.arange(1, 901)
    np.testing.assert_array_equal(columns["anomaly_rank"], expected)


@pytest.fixture(scope="module")
def shipped_float32(trained, tmp_path_factory):
    """float32 embeddings of every shipped file of the default families, and the catalogue columns of their rows."""
    checkpoint = torch.load(trained[0], weights_only=True)
    model, settings = model_from_checkpoint(checkpoint).eval(), data_settings(checkpoint)
    index_path = tmp_path_factory.mktemp("index") / "index.npz"
    dataset = SeismicSTFTDataset(
        SHIPPED, settings["families"], settings["stft"], settings["extensions"], index_path=index_path
    )
    loader = DataLoader(dataset, batch_sampler=LengthBatchSampler(dataset.time_bins(), 16), collate_fn=pad_collate)
    vectors, stations, families = [], [], []
    for batch in loader:
        vectors.append(encode_batch(model, batch["spectrogram"].float(), batch["mask"])[0])
        stations += [meta["trace_id"].split(".")[1] for meta in batch["meta"]]
        families += [meta["family"] for meta in batch["meta"]]
    return np.concatenate(vectors), {"station": stations, "family": families}


def test_float16_storage_keeps_label_scores_and_neighbours(shipped_float32):
    """What float16 (embeddings.npy) changes against float32 on the 163 shipped files. Measured with a 1-epoch model:
    k-NN accuracy the same; 1 of the 815 leave-one-out neighbours changes (a near tie), so family precision@5 moves
    by 1/815; silhouettes by 2e-5; search recall@10 0.9988. Batch size (1 or 16) changes nothing in float32."""
    full, labels = shipped_float32
    half = full.astype(STORED_DTYPE).astype(np.float32)
    assert len(full) == 163 and np.isfinite(half).all()
    assert np.abs(half - full).max() <= np.abs(full).max() * 2**-11
    pairs = len(full) * representation.NEIGHBOURS
    for values in labels.values():
        scores = [label_scores(standardised(e), values, 0) for e in (half, full)]
        assert scores[0]["knn_accuracy"] == scores[1]["knn_accuracy"]
        assert scores[0]["precision_at_k"] == pytest.approx(scores[1]["precision_at_k"], abs=2 / pairs)
        assert scores[0]["silhouette"] == pytest.approx(scores[1]["silhouette"], abs=1e-4)
    neighbours = [leave_one_out_neighbours(standardised(e)) for e in (half, full)]
    changed = sum(len(set(a) - set(b)) for a, b in zip(*neighbours))
    assert changed <= 2  # of 815 neighbours: 1 measured
    found = [SearchIndex(e).nearest(e, 11)[1][:, 1:] for e in (half, full)]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(*found)])
    assert recall >= 0.995  # 0.9988 measured


def test_catalogue_parquet_equals_csv_and_embeddings_are_memory_mapped(trained, tmp_path):
    checkpoint, data_dir = trained
    out = tmp_path / "out"
    embed.main([checkpoint, "--data_dir", data_dir, "--output_dir", str(out), "--device", "cpu", "--clusters", "2"])
    csv_table = pd.read_csv(out / "catalog.csv", keep_default_na=False)
    parquet_table = pd.read_parquet(out / "catalog.parquet")
    pd.testing.assert_frame_equal(csv_table, parquet_table, check_dtype=False)
    embeddings = embed.read_embeddings(out / "embeddings.npy")
    assert isinstance(embeddings, np.memmap) and embeddings.dtype == np.float16 and len(embeddings) == len(csv_table)
    assert not [name for name in os.listdir(out) if name.endswith(".part")]  # the catalogue's parts are joined


def test_catalogue_parts_hold_8_bytes_a_row_and_join_in_rank_order(trained, tmp_path, monkeypatch):
    """The catalogue while embedding: rows streamed to Parquet parts (one per process), 8 bytes a row kept in memory
    (position, anomaly ratio); joined in rank order into catalog.parquet and catalog.csv in row groups, with added
    columns that come in blocks of another size."""
    checkpoint, data_dir = trained
    out = tmp_path / "out"
    embed.main([checkpoint, "--data_dir", data_dir, "--output_dir", str(out), "--device", "cpu", "--clusters", "2"])
    real = pd.read_parquet(out / "catalog.parquet")
    rows = [row for _, row in real.drop(columns=list(embed.CATALOG_COLUMNS[10:15])).iterrows()]
    rows = [row.to_dict() for row in rows] * (20_000 // len(rows) + 1)
    tracemalloc.start()
    parts = []
    for rank, share in enumerate((rows[:7_000], rows[7_000:20_000])):
        part = catalogue.CatalogPart(tmp_path, rank, flush_every=1_000)
        before = tracemalloc.get_traced_memory()[0]
        for position, row in enumerate(share):
            part.append(row, position + 7_000 * rank)
        held = tracemalloc.get_traced_memory()[0] - before
        parts.append(part.close())
        assert held < 1_000 * 2_000 + 40 * len(share)  # the pending rows, and little per row streamed (200 B before)
    tracemalloc.stop()
    joined_parts = catalogue.Catalogue(parts)
    assert joined_parts.position.tolist() == list(range(20_000)) and len(joined_parts) == 20_000
    assert joined_parts.position.dtype == np.int32 and joined_parts.ratio.dtype == np.float32
    expected = (real.mse.to_numpy() / real.mse_time_mean.to_numpy()).astype(np.float32)
    np.testing.assert_array_equal(joined_parts.ratio[: len(real)], expected)
    monkeypatch.setattr(catalogue, "CATALOG_ROW_GROUP", 4_096)
    blocks = ({name: np.arange(start, min(start + 3_000, 20_000)) for name in embed.CATALOG_COLUMNS[10:15]}
              for start in range(0, 20_000, 3_000))  # fmt: skip
    catalogue.write_catalog(tmp_path, joined_parts.tables(), blocks)
    joined_parts.remove()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]
    written = pq.ParquetFile(tmp_path / "catalog.parquet")
    assert [written.metadata.row_group(g).num_rows for g in range(written.num_row_groups)] == [4_096] * 4 + [3_616]
    joined = pd.read_parquet(tmp_path / "catalog.parquet")
    assert list(joined.columns) == list(embed.CATALOG_COLUMNS) and (joined.cluster == np.arange(20_000)).all()
    assert joined.path.tolist() == [row["path"] for row in rows[:20_000]]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "catalog.csv", keep_default_na=False), joined, check_dtype=False
    )
