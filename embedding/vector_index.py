"""Nearest recordings among embed.py's embeddings with FAISS: the index embed.py writes and similar.py searches.

The space is the one of embed.py's label scores (representation.standardised): each embedding value standardised
to zero mean and unit variance over the catalogue (mean and scale stored beside the index), Euclidean distance.

    rows <= exact_max_rows  IndexFlatL2: exact; one query scans every row. exact_max_rows = EXACT_MAX_VALUES / D: the
                            rows x values a flat query scans within the 20 ms target on 2 cores (docs/search.md)
    more rows, D <= p       IVF{nlist},SQ8: standardised embeddings cut into nlist k-means cells, each value stored in
                            8 bits (D bytes a row: 32 for the read-out)
    more rows, D > p        PCA{p},IVF{nlist},PQ{m}: standardised embeddings rotated to their p principal components,
                            cut into nlist cells, each row stored as m bytes (product quantisation)
    A query scans the nprobe nearest cells, and the k x rerank best candidates are re-ranked by their exact distance,
    computed from the stored embeddings (embeddings.npy, memory-mapped).

Everything is built in chunks of rows: no full float32 copy of the embeddings is held in memory (the flat index is
that copy, another reason it stops at exact_max_rows). On disk, in the embeddings folder: index.faiss (faiss.write_index
format), index_scale.npy ((2, D) float64: mean and scale of each value) and index.json (the settings and row count).
Where faiss was built with CUDA and a GPU is present, `load(..., device="cuda")` moves the index to the GPU (guarded:
falls back to the CPU; not exercised by the tests, which run on CPU builds of faiss).
"""

import json
import logging
import math
import os
import time

import faiss
import numpy as np
from sklearn.utils.extmath import randomized_svd

from embedding.catalogue import read_in_chunks, read_rows
from embedding.representation import fit_sample
from running.storage import atomic_write, write_json_atomic

log = logging.getLogger("vector_index")
INDEX_FILE, SCALE_FILE, SETTINGS_FILE = "index.faiss", "index_scale.npy", "index.json"
EXACT_MAX_VALUES = 5_000 * 2_304  # rows x D of the largest flat (exact) index; beyond, IVF (docs/search.md)
PCA_COMPONENTS = 128  # principal components the IVF index works in, where D is larger
PQ_BYTES = 32  # bytes per row of the product-quantised codes of the PCA components (sub-quantisers of 8 bits)
UNREDUCED_CODES = "SQ8"  # codes of D <= PCA_COMPONENTS values: 8 bits each (D bytes a row; docs/search.md)
NPROBE = 32  # cells scanned per query
RERANK = 10  # candidates per neighbour re-ranked by exact distance (k x RERANK read from the embeddings)
ROWS_PER_CELL = 1000  # nlist ~ rows / ROWS_PER_CELL, a power of 2 in [MIN_CELLS, MAX_CELLS]
MIN_CELLS, MAX_CELLS = 16, 4096
TRAIN_PER_CELL = 40  # k-means training rows per cell (faiss asks for at least 39)
PCA_TRAIN_ROWS = 20_000  # rows the PCA is fitted on
KMEANS_ITERATIONS = 10  # of the cells and of the PQ codebooks (faiss: 25); the re-ranking makes up the difference
CHUNK = 20_000  # rows read, standardised and added at a time


def exact_rows(dim):
    """The most rows of dim values that a flat (exact) index holds: EXACT_MAX_VALUES / dim (5,000 rows of 2,304 values,
    360,000 of 32)."""
    return max(1, EXACT_MAX_VALUES // dim)


def choose_settings(n_rows, dim, exact_max_rows=None, unreduced_codes=UNREDUCED_CODES):
    """The index for n_rows embeddings of dim values: {"kind", "factory" (the faiss.index_factory string of the index
    built: its PCA is fitted by randomized SVD, see principal_axes), "nlist", "nprobe", "rerank", ...}.
    exact_max_rows: flat up to this many rows (default: exact_rows(dim)); unreduced_codes: the faiss codes of rows of
    D <= PCA_COMPONENTS values (bench.py --search_codes compares them)."""
    if n_rows < 1 or dim < 1:
        raise ValueError(f"an index needs at least one row and one value per row, got {n_rows} x {dim}")
    if n_rows <= (exact_max_rows or exact_rows(dim)):
        return {"kind": "exact", "factory": "Flat", "rerank": 1}
    cells = 2 ** round(math.log2(max(MIN_CELLS, min(MAX_CELLS, n_rows / ROWS_PER_CELL))))
    ivf = {"kind": "ivf", "nlist": cells, "nprobe": min(NPROBE, cells), "rerank": RERANK}
    if dim <= PCA_COMPONENTS:  # nothing to reduce: every value coded as it is
        return {**ivf, "factory": f"IVF{cells},{unreduced_codes}", "components": dim, "codes": unreduced_codes}
    codes = f"PQ{math.gcd(PQ_BYTES, PCA_COMPONENTS)}"  # the sub-quantisers split the components evenly
    return {**ivf, "factory": f"PCA{PCA_COMPONENTS},IVF{cells},{codes}", "components": PCA_COMPONENTS, "codes": codes}


class VectorIndex:
    """A faiss index of standardised embeddings with the mean and scale that standardise queries."""

    def __init__(self, index, mean, scale, settings):
        self.index, self.mean, self.scale, self.settings = index, mean, scale, settings
        self.mean32, self.inverse_scale32 = mean.astype(np.float32), (1 / scale).astype(np.float32)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = settings["nprobe"]

    @property
    def rows(self):
        return int(self.index.ntotal)

    def standardise(self, embeddings):
        """(N, D) embeddings of any float type -> float32 standardised values."""
        return (np.asarray(embeddings, dtype=np.float32) - self.mean32) * self.inverse_scale32

    def search(self, queries, k, embeddings=None):
        """(distances (Q, k), rows (Q, k)) of the k nearest rows to each query embedding (Q, D), nearest first.

        With `embeddings` (the indexed matrix, e.g. a memmap of embeddings.npy) the index's k x rerank candidates are
        re-ranked by their exact distance; without it, the distances are the index's own (approximate for IVF-PQ).
        Fewer than k rows indexed: the missing entries are row -1 at distance inf.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        standardised = self.standardise(np.atleast_2d(queries))
        wanted = min(k * (self.settings["rerank"] if embeddings is not None else 1), self.rows)
        squared, rows = self.index.search(standardised, wanted)
        if embeddings is None:
            return fill(np.sqrt(np.maximum(squared, 0)), rows, k)
        return fill(*self.rerank(standardised, rows, embeddings, k), k)

    def rerank(self, standardised, candidates, embeddings, k, batch=64):
        """Exact distances (differences, not the expanded dot products) to each query's candidates; the k nearest."""
        distances = np.full((len(candidates), min(k, candidates.shape[1])), np.inf, dtype=np.float32)
        rows = np.full(distances.shape, -1, dtype=np.int64)
        for start in range(0, len(candidates), batch):
            block = candidates[start : start + batch]
            unique = np.unique(block[block >= 0])
            stored = self.standardise(read_rows(embeddings, unique))
            for i, found in enumerate(block, start):
                found = found[found >= 0]
                exact = np.linalg.norm(stored[np.searchsorted(unique, found)] - standardised[i], axis=1)
                order = np.argsort(exact, kind="stable")[:k]
                distances[i, : len(order)], rows[i, : len(order)] = exact[order], found[order]
        return distances, rows

    def write(self, directory):
        """index.faiss, index_scale.npy and index.json into `directory`, each atomically (index.json last)."""
        index = faiss.index_gpu_to_cpu(self.index) if hasattr(self, "gpu_resources") else self.index
        # Streamed to the file: faiss.serialize_index would hold two more copies of the index in memory.
        atomic_write(
            os.path.join(directory, INDEX_FILE), lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        )
        atomic_write(os.path.join(directory, SCALE_FILE), lambda f: np.save(f, np.stack([self.mean, self.scale])))
        write_json_atomic(os.path.join(directory, SETTINGS_FILE), {**self.settings, "rows": self.rows})

    def bytes(self):
        """Size of the index as written (faiss.serialize_index), without the stored embeddings."""
        return int(faiss.serialize_index(self.index).nbytes) + 2 * self.mean.nbytes


def fill(distances, rows, k):
    """Pad (Q, found) results to (Q, k) with row -1 at distance inf (faiss marks missing results with -1)."""
    distances = np.where(rows >= 0, distances, np.inf).astype(np.float32)
    missing = k - rows.shape[1]
    if missing > 0:
        distances = np.pad(distances, ((0, 0), (0, missing)), constant_values=np.inf)
        rows = np.pad(rows, ((0, 0), (0, missing)), constant_values=-1)
    return distances, rows


def fit_scale(embeddings, chunk=CHUNK):
    """(mean, scale) of each value over all rows, chunk by chunk, as scikit-learn's StandardScaler computes them
    (population variance; scale 1 for a constant value).
    Sums of the values less the first chunk's mean, in float64, so that large means cost no precision."""
    shift = None
    for _, rows in read_in_chunks(embeddings, chunk):
        if shift is None:
            shift = rows.astype(np.float64).mean(axis=0)
            total, squares = np.zeros_like(shift), np.zeros_like(shift)
        centred = rows.astype(np.float64) - shift
        total += centred.sum(axis=0)
        squares += np.einsum("ij,ij->j", centred, centred)
    mean = total / len(embeddings)
    variance = np.maximum(squares / len(embeddings) - mean**2, 0)
    scale = np.sqrt(variance)
    scale[variance < 10 * np.finfo(np.float64).eps * np.maximum((mean + shift) ** 2, 1)] = 1.0
    return mean + shift, scale


def principal_axes(sample, components, seed):
    """faiss.LinearTransform onto the first principal components of a (S, D) sample (randomized SVD: seconds where
    faiss's PCAMatrix, which computes all D eigenvectors, takes minutes at D = 2,304)."""
    mean = sample.mean(axis=0)
    _, _, axes = randomized_svd(sample - mean, components, n_iter=4, random_state=seed)  # (components, D)
    transform = faiss.LinearTransform(sample.shape[1], components, True)
    faiss.copy_array_to_vector(np.ascontiguousarray(axes, dtype=np.float32).ravel(), transform.A)
    faiss.copy_array_to_vector((-axes @ mean).astype(np.float32), transform.b)
    transform.is_trained = True
    return transform


def trained_index(embeddings, standardise, settings, seed):
    """PCA (where the factory has one) fitted on PCA_TRAIN_ROWS rows; IVF cells and PQ codebooks on
    TRAIN_PER_CELL x nlist rows, rotated chunk by chunk (163,840 rows of 2,304 float32 values would be 1.5 GB)."""
    components, rotate = settings["components"], None
    if settings["factory"].startswith("PCA"):
        sample = standardise(read_rows(embeddings, fit_sample(len(embeddings), seed, PCA_TRAIN_ROWS)))
        rotate = principal_axes(sample, components, seed)
    rows = fit_sample(len(embeddings), seed + 1, TRAIN_PER_CELL * settings["nlist"])
    chunks = (standardise(read_rows(embeddings, rows[i : i + CHUNK])) for i in range(0, len(rows), CHUNK))
    training = np.concatenate([rotate.apply(chunk) if rotate else chunk for chunk in chunks])
    ivf = faiss.index_factory(components, f"IVF{settings['nlist']},{settings['codes']}")
    ivf.cp.seed, ivf.cp.niter = seed, KMEANS_ITERATIONS
    if settings["codes"].startswith("PQ"):
        ivf.pq.cp.seed, ivf.pq.cp.niter = seed, KMEANS_ITERATIONS  # the re-ranking makes up for fewer iterations
        ivf.do_polysemous_training = False  # index_factory's default: minutes of annealing for a code search not used
    ivf.train(training)
    return faiss.IndexPreTransform(rotate, ivf) if rotate else ivf  # the wrapper keeps both parts alive with it


def build(embeddings, exact_max_rows=None, seed=0, unreduced_codes=UNREDUCED_CODES):
    """The index of an (N, D) matrix (array or memmap of any float type), read CHUNK rows at a time."""
    n_rows, dim = embeddings.shape
    settings = {**choose_settings(n_rows, dim, exact_max_rows, unreduced_codes), "dim": int(dim), "seed": seed}
    started = time.perf_counter()
    mean, scale = fit_scale(embeddings)
    vector_index = VectorIndex(faiss.IndexFlatL2(dim), mean, scale, settings)
    if settings["kind"] != "exact":
        index = trained_index(embeddings, vector_index.standardise, settings, seed)
        vector_index = VectorIndex(index, mean, scale, settings)
    for _, rows in read_in_chunks(embeddings, CHUNK):
        vector_index.index.add(vector_index.standardise(rows))
    log.info("index %s of %d rows built in %.1f s", settings["factory"], n_rows, time.perf_counter() - started)
    return vector_index


def build_for(directory, exact_max_rows=None):
    """Build the index of DIRECTORY/embeddings.npy and write it beside it (embed.py calls this)."""
    embeddings = np.load(os.path.join(directory, "embeddings.npy"), mmap_mode="r")
    vector_index = build(embeddings, exact_max_rows)
    vector_index.write(directory)
    return vector_index


def load(directory, n_rows=None, device="cpu"):
    """The index written into `directory`, or None where there is none or it indexes another number of rows than
    n_rows (outputs of an older embed.py, or embeddings rewritten since). device "cuda": on the GPU where possible."""
    paths = [os.path.join(directory, name) for name in (INDEX_FILE, SCALE_FILE, SETTINGS_FILE)]
    if not all(os.path.exists(p) for p in paths):
        return None
    with open(paths[2]) as f:
        settings = json.load(f)
    if n_rows is not None and settings["rows"] != n_rows:
        log.warning("%s indexes %d rows, the embeddings hold %d: not used", paths[0], settings["rows"], n_rows)
        return None
    mean, scale = np.load(paths[1])
    vector_index = VectorIndex(faiss.read_index(paths[0]), mean, scale, settings)
    return to_gpu(vector_index) if str(device).startswith("cuda") else vector_index


def to_gpu(vector_index):
    """The index moved to the first GPU where faiss has CUDA support and sees a GPU; else unchanged (untested here:
    the CPU build of faiss has no StandardGpuResources)."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        log.info("faiss has no GPU here: searching on the CPU")
        return vector_index
    try:
        vector_index.gpu_resources = faiss.StandardGpuResources()
        vector_index.index = faiss.index_cpu_to_gpu(vector_index.gpu_resources, 0, vector_index.index)
        if vector_index.settings["kind"] != "exact":
            faiss.GpuParameterSpace().set_index_parameter(vector_index.index, "nprobe", vector_index.settings["nprobe"])
    except RuntimeError as err:  # an index type without a GPU version: stays on the CPU
        log.warning("index stays on the CPU: %s", err)
        del vector_index.gpu_resources
    return vector_index
