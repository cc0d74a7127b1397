"""bench.py --search N [N ...]: the vector index of vector_index.py at N rows, on real embeddings tiled to N.

Real embeddings: the shipped recordings of the default families read as 30 s windows every 3 s (about 3,400 windows),
encoded by a checkpoint's model (--checkpoint) or, without one, by a ConvAutoencoder of the default architecture with
weights drawn at random (seed 0): real spectrograms, untrained features (the figures say which). Tiled to N: row r < n
is real window r; row r >= n is real window r mod n plus PERTURBATION x the difference of two other real windows chosen
by a hash of r, so that every row of the N can be regenerated from its number and none is stored (at 10^7 x 2,304
float32 they would be 92 GB). The index is built from these rows in chunks, as embed.py builds it from embeddings.npy.

Per N: build seconds (scale, train, add); bytes per vector (the index as written, plus the embeddings as stored beside
it, float16: computed, not written); one query (k = 10) timed QUERIES times and a batch of QUERIES queries timed
BATCH_REPEATS times, p50/p99 in ms, each re-ranked from the (regenerated) embeddings as similar.py re-ranks from the
memory-mapped embeddings.npy; recall@10 against exact search (brute force over all N standardised rows, streamed) on
QUERIES rows drawn at random.
"""

import itertools
import time

import faiss
import numpy as np
import torch
from torch.utils.data import DataLoader

from embedding import vector_index
from embedding.poolings import encode_batch
from measuring.results import markdown_table
from model import ConvAutoencoder
from reading.batching import LengthBatchSampler
from running.checkpoints import data_settings, model_from_checkpoint
from stft_dataset import SeismicSTFTDataset, pad_collate

WINDOW_SECONDS, WINDOW_STRIDE = 30.0, 3.0  # windows of the shipped 90 s recordings that are tiled
PERTURBATION = 0.1  # scale of the difference of two real rows added to each tiled copy
QUERIES = 1000  # single queries timed, queries per timed batch, and queries of the recall
BATCH_REPEATS = 5  # timed batches of QUERIES queries
K = 10
STORED_BYTES_PER_VALUE = 2  # embeddings.npy as float16 (issue 22)


def real_embeddings(data_dir, checkpoint=None, batch_size=64):
    """(n, D) float32 embeddings of the windows of data_dir's recordings, and a line saying which model made them."""
    if checkpoint:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model, data = model_from_checkpoint(loaded, torch.device("cpu")), data_settings(loaded)
        families, stft, made_by = data["families"], data["stft"], f"model of {checkpoint}"
        dataset = SeismicSTFTDataset(
            data_dir, families, stft, window_seconds=WINDOW_SECONDS, window_stride=WINDOW_STRIDE
        )
    else:
        torch.manual_seed(0)
        model, made_by = ConvAutoencoder(), "ConvAutoencoder with random weights (seed 0), no checkpoint"
        dataset = SeismicSTFTDataset(data_dir, window_seconds=WINDOW_SECONDS, window_stride=WINDOW_STRIDE)
    model.eval()
    sampler = LengthBatchSampler(dataset.time_bins(), batch_size, list(range(len(dataset))))
    vectors = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate):
            if batch["spectrogram"] is not None:
                vectors.append(encode_batch(model, batch["spectrogram"].float(), batch["mask"])[0])
    windows = f"{WINDOW_SECONDS:g} s windows every {WINDOW_STRIDE:g} s of {data_dir}"
    return np.concatenate(vectors), f"{sum(len(v) for v in vectors)} {windows}, {made_by}"


class TiledEmbeddings:
    """n_rows embeddings made from n real ones (module docstring); indexed like an (n_rows, D) array: a slice or an
    array of row numbers gives float32 rows, regenerated on each access."""

    def __init__(self, real, n_rows):
        if n_rows < len(real):
            raise ValueError(f"--search {n_rows}: fewer rows than the {len(real)} real embeddings")
        self.real, self.shape, self.dtype = np.asarray(real, dtype=np.float32), (n_rows, real.shape[1]), np.float32

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        n = len(self.real)
        first = mixed(rows, 1) % n
        second = (first + 1 + mixed(rows, 2) % (n - 1)) % n if n > 1 else first  # never the first: no exact copies
        copy = (rows >= n)[:, None].astype(np.float32)
        return self.real[rows % n] + PERTURBATION * copy * (self.real[first] - self.real[second])


def mixed(rows, salt):
    """A hash of each row number (splitmix64's finaliser): uniform over uint64, the same on every call."""
    x = rows.astype(np.uint64) + np.uint64(salt * 0x9E3779B97F4A7C15 % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))).astype(np.int64) & np.int64(2**62 - 1)


def exact_neighbours(embeddings, index, queries, k=K, chunk=vector_index.CHUNK):
    """(Q, k) rows of the exact k nearest (standardised, Euclidean) of each query, by brute force over all rows."""
    heap = faiss.ResultHeap(len(queries), k)
    standardised = index.standardise(queries)
    for start in range(0, len(embeddings), chunk):
        rows = index.standardise(embeddings[start : start + chunk])
        distances, found = faiss.knn(standardised, rows, min(k, len(rows)))
        heap.add_result(distances, np.where(found >= 0, found + start, -1))
    heap.finalize()
    return heap.I


def percentiles_ms(seconds):
    return float(np.percentile(seconds, 50) * 1e3), float(np.percentile(seconds, 99) * 1e3)


def timed(call):
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(real, n_rows, exact_max_rows=None, queries=QUERIES, seed=0, codes=vector_index.UNREDUCED_CODES):
    """Figures of the index at n_rows tiled rows (module docstring)."""
    embeddings = TiledEmbeddings(real, n_rows)
    started = time.perf_counter()
    index = vector_index.build(embeddings, exact_max_rows, seed, codes)
    build_s = time.perf_counter() - started
    query_rows = np.sort(np.random.default_rng(seed).choice(n_rows, min(queries, n_rows), replace=False))
    query_vectors = embeddings[query_rows]
    index.search(query_vectors[:1], K, embeddings)  # first call: faiss's threads start
    single = [timed(lambda q=q: index.search(q[None], K, embeddings)) for q in query_vectors]
    batch = [timed(lambda: index.search(query_vectors, K, embeddings)) for _ in range(BATCH_REPEATS)]
    _, found = index.search(query_vectors, K, embeddings)
    truth = exact_neighbours(embeddings, index, query_vectors)
    recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)])
    return {
        "n": n_rows,
        "factory": index.settings["factory"],
        "nprobe": index.settings.get("nprobe"),
        "build_s": build_s,
        "index_bytes_per_vector": index.bytes() / n_rows,
        "bytes_per_vector": index.bytes() / n_rows + STORED_BYTES_PER_VALUE * real.shape[1],
        "query_ms": percentiles_ms(single),
        "batch_ms": percentiles_ms(batch),
        "recall_at_10": float(recall),
    }


def search_stage(sizes, data_dir, checkpoint=None, exact_max_rows=None, queries=QUERIES, codes=None):
    """bench.py's search figures at each N of sizes (and each of `codes`, the codes of embeddings of at most
    vector_index.PCA_COMPONENTS values; default: vector_index's): JSON keys search_* (lists, one entry per N and codes);
    prints a table."""
    real, source = real_embeddings(data_dir, checkpoint)
    print(f"search: {source}; tiled to N with perturbations of {PERTURBATION:g} x (one real row - another)")
    print(
        f"{'N':>10} {'index':24} {'build s':>8} {'B/vector':>17} {'1 query ms p50/p99':>19} "
        f"{f'{queries} queries ms p50/p99':>24} {'recall@10':>9}"
    )
    results = []
    for n_rows, chosen in itertools.product(sizes, codes or [vector_index.UNREDUCED_CODES]):
        r = measure(real, n_rows, exact_max_rows, queries, codes=chosen)
        results.append(r)
        print(
            f"{n_rows:>10,} {r['factory']:24} {r['build_s']:8.1f} "
            f"{r['bytes_per_vector']:7.0f} ({r['index_bytes_per_vector']:5.0f} idx) "
            f"{r['query_ms'][0]:9.2f} / {r['query_ms'][1]:7.2f} {r['batch_ms'][0]:12.0f} / {r['batch_ms'][1]:9.0f} "
            f"{r['recall_at_10']:9.3f}",
            flush=True,
        )
    return {
        "search_source": source,
        "search_queries": queries,
        "search_n": [r["n"] for r in results],
        "search_index": [r["factory"] for r in results],
        "search_build_s": [r["build_s"] for r in results],
        "search_bytes_per_vector": [r["bytes_per_vector"] for r in results],
        "search_index_bytes_per_vector": [r["index_bytes_per_vector"] for r in results],
        "search_query_ms_p50": [r["query_ms"][0] for r in results],
        "search_query_ms_p99": [r["query_ms"][1] for r in results],
        "search_batch_ms_p50": [r["batch_ms"][0] for r in results],
        "search_batch_ms_p99": [r["batch_ms"][1] for r in results],
        "search_recall_at_10": [r["recall_at_10"] for r in results],
    }


def markdown(f):
    """The results file's body: the table of search_stage's figures."""
    rows = [
        (f"{n:,}", index, f"{build:.1f}", f"{stored:,.0f} ({own:,.0f})", f"{q50:.2f} / {q99:.2f}",
         f"{b50:,.0f} / {b99:,.0f}", f"{recall:.3f}")
        for n, index, build, stored, own, q50, q99, b50, b99, recall in zip(
            f["search_n"], f["search_index"], f["search_build_s"], f["search_bytes_per_vector"],
            f["search_index_bytes_per_vector"], f["search_query_ms_p50"], f["search_query_ms_p99"],
            f["search_batch_ms_p50"], f["search_batch_ms_p99"], f["search_recall_at_10"],
        )
    ]  # fmt: skip
    queries = f["search_queries"]
    header = ["N", "index", "build s", "bytes/vector (index)", "1 query ms p50 / p99",
              f"{queries} queries ms p50 / p99", "recall@10"]  # fmt: skip
    return f"{f['search_source']}; tiled to N with perturbations of {PERTURBATION:g}\n\n" + markdown_table(header, rows)
