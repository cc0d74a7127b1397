"""vector_index.py (the FAISS index that embed.py writes), similar.py's lists of queries, bench.py --search."""

import json
import os
import shutil
from dataclasses import asdict

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import SearchIndex, copy_files, shipped_files

import bench
import embed
import similar
from embedding import catalogue, vector_index
from measuring import bench_search
from model import ConvAutoencoder
from reading.transform import STFTConfig
from reading.waveforms import DEFAULT_FAMILIES, MINISEED_EXTENSIONS


@pytest.fixture(scope="module")
def real_embeddings(tmp_path_factory):
    """(168, 2304) embeddings of 30 s windows (every 3 s) of 8 shipped recordings, random-weight model."""
    data_dir = copy_files(shipped_files(), tmp_path_factory.mktemp("windows") / "waveforms")
    embeddings, source = bench_search.real_embeddings(data_dir)
    assert embeddings.shape == (8 * 21, 2304) and "random weights" in source
    return embeddings


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """embed.py's outputs for 8 shipped recordings with a checkpoint of random weights: (output_dir, data_dir)."""
    base = tmp_path_factory.mktemp("embedded")
    data_dir = copy_files(shipped_files(), base / "waveforms")
    torch.manual_seed(0)
    model = ConvAutoencoder()
    checkpoint = {
        "model_state": model.state_dict(),
        "model_config": model.config.to_dict(),
        "stft_config": asdict(STFTConfig()),
        "args": {"data_dir": data_dir, "channels": list(DEFAULT_FAMILIES), "extensions": list(MINISEED_EXTENSIONS)},
        "run_name": "random",
    }
    torch.save(checkpoint, base / "random.pt")
    argv = [str(base / "random.pt"), "--output_dir", str(base / "out"), "--device", "cpu", "--clusters", "2"]
    embed.main(argv + ["--num_anomalies", "0", "--projector_points", "0"])
    return base / "out", data_dir


def test_index_round_trip_every_recording_finds_itself_first(real_embeddings, tmp_path):
    built = vector_index.build(real_embeddings)
    assert built.settings["kind"] == "exact" and built.rows == len(real_embeddings)
    built.write(tmp_path)
    loaded = vector_index.load(tmp_path, len(real_embeddings))
    assert loaded.settings == {**built.settings, "rows": len(real_embeddings)}
    distances, rows = loaded.search(real_embeddings, 5, real_embeddings)
    assert (rows[:, 0] == np.arange(len(rows))).all() and (distances[:, 0] == 0).all()
    # the space and the neighbours of the scikit-learn search that similar.py used before the index
    expected_distances, expected_rows = SearchIndex(real_embeddings).nearest(real_embeddings, 5)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-3)
    assert (rows[:, :2] == expected_rows[:, :2]).mean() > 0.99  # ties and float rounding may swap a far pair
    assert vector_index.load(tmp_path, len(real_embeddings) + 1) is None  # indexes other rows: not used
    assert vector_index.load(tmp_path / "nothing") is None


def test_beyond_exact_max_rows_the_index_is_ivf_pq_and_still_finds_the_rows(real_embeddings, tmp_path):
    tiled = bench_search.TiledEmbeddings(real_embeddings, 2000)
    np.testing.assert_array_equal(tiled[:168], real_embeddings)
    np.testing.assert_array_equal(tiled[[1500, 5]], tiled[1500:1501].tolist() + [real_embeddings[5].tolist()])
    assert vector_index.build(tiled, exact_max_rows=2000).settings["factory"] == "Flat"
    built = vector_index.build(tiled, exact_max_rows=500)
    assert built.settings["factory"] == "PCA128,IVF16,PQ32" and built.settings["nprobe"] == 16
    built.write(tmp_path)
    loaded = vector_index.load(tmp_path, len(tiled))
    queries = np.arange(0, 2000, 20)
    distances, rows = loaded.search(tiled[queries], 10, tiled)
    assert (rows[:, 0] == queries).all() and (distances[:, 0] == 0).all() and (distances[:, 1] > 0).all()
    assert (np.diff(distances, axis=1) >= 0).all()
    truth = bench_search.exact_neighbours(tiled, loaded, tiled[queries])
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(rows, truth)]) >= 0.9
    _, approximate = loaded.search(tiled[queries], 10)  # no re-ranking: the index's own distances
    assert (approximate[:, 0] == queries).mean() > 0.5


def test_exact_up_to_the_values_a_query_may_scan_then_ivf_with_pca_only_where_it_reduces():
    # flat while rows x D <= EXACT_MAX_VALUES: 5,000 rows of 2,304 values (time-mean), 360,000 of 32 (the read-out)
    assert vector_index.choose_settings(5_000, 2304)["factory"] == "Flat"
    assert vector_index.choose_settings(5_001, 2304)["factory"] == "PCA128,IVF16,PQ32"
    assert vector_index.choose_settings(360_000, 32)["factory"] == "Flat"
    assert vector_index.choose_settings(360_001, 32)["factory"] == "IVF256,SQ8"  # 32 <= 128 values: no PCA, 8 bits each
    assert vector_index.choose_settings(360_001, 32, unreduced_codes="PQ16")["factory"] == "IVF256,PQ16"
    at_scale = vector_index.choose_settings(10_000_000, 32)
    assert at_scale["factory"] == "IVF4096,SQ8" and at_scale["nprobe"] == 32 and at_scale["rerank"] == 10
    assert vector_index.choose_settings(600, 32, exact_max_rows=500)["factory"] == "IVF16,SQ8"


def test_ivf_pq_of_read_out_sized_embeddings_finds_the_rows(real_embeddings, tmp_path):
    projection = np.random.default_rng(0).normal(size=(real_embeddings.shape[1], 32))  # 32 values, as the read-out
    tiled = bench_search.TiledEmbeddings(real_embeddings @ projection, 2000)
    built = vector_index.build(tiled, exact_max_rows=500)
    assert built.settings["factory"] == "IVF16,SQ8" and not isinstance(built.index, faiss.IndexPreTransform)
    built.write(tmp_path)
    loaded = vector_index.load(tmp_path, len(tiled))
    queries = np.arange(0, 2000, 20)
    distances, rows = loaded.search(tiled[queries], 10, tiled)
    assert (rows[:, 0] == queries).all() and (distances[:, 0] == 0).all()
    truth = bench_search.exact_neighbours(tiled, loaded, tiled[queries])
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(rows, truth)]) >= 0.9


def test_catalogue_reader_decodes_only_the_row_groups_it_needs_and_finds_first_rows(embedded, tmp_path, monkeypatch):
    out, _ = embedded
    stored = pd.read_parquet(out / "catalog.parquet")
    columns = {name: stored[name].to_numpy() for name in stored.columns}
    columns["path"] = np.array(["a.mseed", "b.mseed", "a.mseed", "b.mseed", "c.mseed", "a.mseed", "b.mseed", "c.mseed"])
    monkeypatch.setattr(catalogue, "CATALOG_ROW_GROUP", 3)
    catalogue.write_catalog(tmp_path, [pa.table(columns)])
    reader = catalogue.CatalogueReader(tmp_path)
    assert len(reader) == 8 and reader.file.num_row_groups == 3
    read_groups = []
    monkeypatch.setattr(
        reader.file, "read_row_group", lambda g, f=reader.file.read_row_group, **kw: read_groups.append(g) or f(g, **kw)
    )
    rows = reader.rows([7, 0, 7, 1])
    assert sorted(rows) == [0, 1, 7] and sorted(read_groups) == [0, 2]  # group 1 (rows 3-5) is never decoded
    assert rows[7] == {**stored.iloc[7].to_dict(), "path": "c.mseed"}
    assert reader.first_rows(["c.mseed", "b.mseed", "elsewhere.mseed"]) == {"c.mseed": 4, "b.mseed": 1}
    os.remove(tmp_path / "catalog.parquet")  # outputs of an older embed.py: catalog.csv alone, read as text
    old = catalogue.CatalogueReader(tmp_path)
    assert (
        len(old) == 8
        and old.rows([4])[4]["path"] == "c.mseed"
        and old.rows([4])[4]["cluster"] == str(stored.cluster[4])
    )
    assert old.first_rows(["c.mseed", "elsewhere.mseed"]) == {"c.mseed": 4}


def test_beyond_csv_max_rows_the_catalogue_is_parquet_alone_and_similar_reads_it(embedded, tmp_path, monkeypatch):
    out, _ = embedded
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stored = pd.read_parquet(copy / "catalog.parquet")
    monkeypatch.setattr(catalogue, "CSV_MAX_ROWS", 5)
    catalogue.write_catalog(copy, [pa.Table.from_pandas(stored, preserve_index=False)])
    assert not (copy / "catalog.csv").exists()  # 8 rows > 5: Parquet alone, and the earlier run's CSV is gone
    queries = ["2", stored.path[5], "-k", "3", "--no-figures"]
    found = similar.main([str(copy), *queries, "--table", str(tmp_path / "parquet.csv")])
    expected = similar.main([str(out), *queries, "--table", str(tmp_path / "both.csv")])
    assert [(r["query_row"], r["row"], r["path"]) for r in found] == [
        (r["query_row"], r["row"], r["path"]) for r in expected
    ]
    assert found[0]["query_row"] == 2 and found[3]["query_row"] == 5 and len(found) == 6


def test_fewer_rows_than_k_and_bad_arguments(real_embeddings):
    small = vector_index.build(real_embeddings[:3])
    distances, rows = small.search(real_embeddings[:1], 5, real_embeddings[:3])
    assert rows[0, :3].tolist() == [0, *rows[0, 1:3]] and rows[0, 3:].tolist() == [-1, -1]
    assert np.isinf(distances[0, 3:]).all()
    with pytest.raises(ValueError, match="k must be >= 1"):
        small.search(real_embeddings[:1], 0)
    with pytest.raises(ValueError, match="at least one row"):
        vector_index.choose_settings(0, 2304)


def test_embed_writes_the_index_and_similar_answers_a_list_of_queries_in_one_table(embedded, tmp_path, capsys):
    out, data_dir = embedded
    with open(out / vector_index.SETTINGS_FILE) as f:
        assert json.load(f)["rows"] == 8 and os.path.exists(out / vector_index.INDEX_FILE)
    catalog = pd.read_csv(out / "catalog.csv", keep_default_na=False)
    queries = tmp_path / "queries.txt"
    queries.write_text(f"# rows, a path of the catalogue, a file\n2\n{catalog['path'][5]}\n")
    new_file = os.path.join(data_dir, catalog["path"][6])
    table_path = tmp_path / "near.csv"
    found = similar.main([str(out), "1", new_file, "--queries", str(queries), "-k", "3", "--table", str(table_path)])
    table = pd.read_csv(table_path, keep_default_na=False)
    assert len(table) == len(found) == 4 * 3 and list(table.columns[:5]) == list(similar.TABLE_COLUMNS)
    assert table["query"].tolist() == [q for q in ("1", new_file, "2", catalog["path"][5]) for _ in range(3)]
    assert table["rank"].tolist() == [1, 2, 3] * 4 and set(table.columns) >= set(catalog.columns)
    by_file = table[table["query"] == new_file]
    # itself first: its file encoded alone, rounded to float16 as the stored rows, against rows encoded in batches
    assert by_file["row"].iloc[0] == 6 and by_file["distance"].iloc[0] < 1e-2 * by_file["distance"].iloc[1]
    for query, row in (("1", 1), ("2", 2), (catalog["path"][5], 5)):
        listed = table[table["query"] == query]
        assert row not in listed["row"].tolist() and listed["query_row"].iloc[0] == str(row)
        assert listed["distance"].is_monotonic_increasing
    assert "catalogue row 2" in capsys.readouterr().out and not list(out.glob("similar_*.png"))  # no figures


def test_similar_without_an_index_builds_one_in_memory(embedded, tmp_path):
    out, _ = embedded
    with_index = similar.main([str(out), "3", "-k", "4", "--table", str(tmp_path / "a.csv"), "--no-figures"])
    os.rename(out / vector_index.INDEX_FILE, tmp_path / "moved.faiss")
    try:
        without = similar.main([str(out), "3", "-k", "4", "--table", str(tmp_path / "b.csv"), "--no-figures"])
    finally:
        os.rename(tmp_path / "moved.faiss", out / vector_index.INDEX_FILE)
    assert [(n["row"], n["distance"]) for n in with_index] == [(n["row"], n["distance"]) for n in without]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no query"),
        (["1", "2", "--output", "x.png"], "--output names the figure of a single query"),
        (["--queries", "/nonexistent/queries.txt"], "--queries /nonexistent/queries.txt"),
    ],
)
def test_similar_bad_query_lists_are_parse_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        similar.main([str(tmp_path), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow  # embeds 168 windows and builds two indexes: 45 s on a loaded 2-core machine
def test_bench_search_reports_every_figure_per_n(real_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_search, "BATCH_REPEATS", 2)
    argv = [
        "--data_dir",
        real_dir,
        "--search",
        "300",
        "2000",
        "--search_exact_max_rows",
        "500",
        "--search_queries",
        "50",
        "--markdown",
        str(tmp_path / "results"),
    ]
    figures = bench.main(argv)
    keys = ("search_build_s", "search_bytes_per_vector", "search_query_ms_p50", "search_query_ms_p99")
    assert figures["search_n"] == [300, 2000] and figures["search_index"][0] == "Flat"
    assert figures["search_index"][1].startswith("PCA128,IVF")
    (written,) = (tmp_path / "results").iterdir()
    assert (
        written.name.endswith("-search.md") and "tiled to N" in written.read_text()
    )  # --markdown: the dated results file
    for key in (*keys, "search_recall_at_10"):
        assert len(figures[key]) == 2 and all(value > 0 for value in figures[key]), key
    assert figures["search_recall_at_10"][0] == 1.0  # the flat index is exact
    assert "tiled to N with perturbations" in capsys.readouterr().out


def test_bench_search_sizes_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--search", "0"])
    assert exit_info.value.code == 2 and "--search" in capsys.readouterr().err
