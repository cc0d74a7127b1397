"""The catalogue (one row per recording: where it comes from, its reconstruction errors, its cluster and map
position) and the stored embeddings: EmbeddingWriter streams them to a float16 .npy file, CatalogPart and
write_catalog stream the catalogue to Parquet (and a CSV copy), CatalogueReader reads rows back on demand.
The embeddings themselves are made in embedding/poolings.py."""

import csv
import io
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from numpy.lib import format as npy_format

from running.storage import atomic_write

# embeddings.npy holds float16: half the bytes of float32, and the label scores and nearest neighbours of the shipped
# data are the same as with float32 (tests/test_embed_scale.py; docs/embeddings.md). Arithmetic reads them as float32.
STORED_DTYPE = np.dtype(np.float16)
CATALOG_ROW_GROUP = 65_536  # rows of catalog.parquet decoded together: a few ms to read one row (CatalogueReader)
CSV_MAX_ROWS = 1_000_000  # catalog.csv is written up to this many rows (about 200 MB); beyond, catalog.parquet alone
CATALOG_COLUMNS = (
    "path",  # relative to the data directory
    "trace_id",  # NET.STA.LOC.FAMILY?
    "network",
    "station",
    "location",
    "family",  # channel family: HH, HN, EH, BH, ...
    "starttime",  # ISO 8601, UTC
    "duration_s",
    "mse",  # the model's reconstruction MSE
    "mse_time_mean",  # the time-mean baseline's MSE (baselines.time_mean)
    "cluster",
    "cluster_distance",  # to the cluster's centre, in the clustering space (standardised, PCA)
    "anomaly_rank",  # 1 = the highest mse / mse_time_mean
    "map_x",
    "map_y",
    "trace_name",  # a SeisBench dataset's trace: pandas.merge(catalog, metadata, on="trace_name"); "" for files
    "trace_chunk",  # its chunk ("" unless the dataset is chunked)
    "dataset",  # the SeisBench dataset's folder name
    "sampling_rate",  # Hz, the recording's own before resampling: no data at and above its half (Nyquist)
)


def start_times(starttimes, chunk=CATALOG_ROW_GROUP):
    """(N,) datetime64[s] of catalogue start times (ISO 8601 text), parsed a chunk at a time (no list of N)."""
    times = np.empty(len(starttimes), dtype="datetime64[s]")
    for start in range(0, len(starttimes), chunk):
        times[start : start + chunk] = [text[:19] for text in starttimes[start : start + chunk]]
    return times


def catalog_row(meta, relpath, duration_s, mse, mse_time_mean, sampling_rate):
    """The columns of a recording known when it is embedded (cluster, map and rank are filled in later)."""
    network, station, location, _ = meta["trace_id"].split(".")
    return {
        "path": relpath,
        "trace_id": meta["trace_id"],
        "network": network,
        "station": station,
        "location": location,
        "family": meta["family"],
        "starttime": meta["starttime"],
        "duration_s": round(float(duration_s), 2),
        "mse": float(mse),
        "mse_time_mean": float(mse_time_mean),
        **{name: meta.get(name, "") for name in ("trace_name", "trace_chunk", "dataset")},
        "sampling_rate": float(sampling_rate),
    }


class EmbeddingWriter:
    """Rows appended batch by batch to a raw file of STORED_DTYPE values beside `path` (one part per torchrun process,
    `rank`), so the embeddings are never held in memory whole. `close` ends the part; `merge_parts` writes the .npy."""

    def __init__(self, path, rank=0):
        self.path, self.rows, self.dim = path, 0, None
        self.part = part_path(path, rank)
        self.raw = open(self.part, "wb")

    def append(self, embeddings):
        embeddings = np.ascontiguousarray(embeddings, dtype=STORED_DTYPE)
        self.dim = embeddings.shape[1]
        self.raw.write(embeddings.tobytes())
        self.rows += len(embeddings)

    def close(self, merge=True):
        """Ends the part; with `merge` (one process) writes the .npy of it at once."""
        self.raw.close()
        if merge:
            merge_parts(self.path, [self.part], self.dim)


def part_path(path, rank):
    return f"{path}.rank{rank}.rows"


def merge_parts(path, parts, dim):
    """The raw parts, in the order given, as one (rows, dim) .npy of STORED_DTYPE, written atomically and copied in
    chunks; the parts are removed."""
    try:
        rows = sum(os.path.getsize(part) for part in parts) // (STORED_DTYPE.itemsize * dim) if dim else 0
        header = {"descr": npy_format.dtype_to_descr(STORED_DTYPE), "fortran_order": False, "shape": (rows, dim or 0)}

        def write(f):
            npy_format.write_array_header_1_0(f, header)
            for part in parts:
                with open(part, "rb") as raw:
                    shutil.copyfileobj(raw, f, 16 << 20)

        atomic_write(path, write)
    finally:
        for part in parts:
            if os.path.exists(part):
                os.remove(part)


def read_embeddings(path):
    """embeddings.npy memory-mapped (read-only): rows are read from disk as they are indexed, whatever N is."""
    return np.load(path, mmap_mode="r")


def read_in_chunks(embeddings, chunk):
    """(start row, float32 rows) of every `chunk` rows. A memory map (np.load mmap_mode) is read with plain file
    reads: pages read through the map would stay in this process's resident memory, N x D bytes by the end."""
    if not isinstance(embeddings, np.memmap) or embeddings.filename is None:
        for start in range(0, len(embeddings), chunk):
            yield start, np.asarray(embeddings[start : start + chunk], dtype=np.float32)
        return
    dim = embeddings.shape[1]
    with open(embeddings.filename, "rb") as f:
        f.seek(embeddings.offset)
        for start in range(0, len(embeddings), chunk):
            count = min(chunk, len(embeddings) - start) * dim
            yield start, np.fromfile(f, embeddings.dtype, count).reshape(-1, dim).astype(np.float32)


def read_rows(embeddings, rows):
    """float32 copy of the rows `rows` (sorted row numbers) of `embeddings`; a memory map is read with plain file
    reads, as in read_in_chunks: a few rows spread over the map would bring most of it into resident memory."""
    if not isinstance(embeddings, np.memmap) or embeddings.filename is None:
        return np.asarray(embeddings[rows], dtype=np.float32)
    dim, row_bytes = embeddings.shape[1], embeddings.shape[1] * embeddings.dtype.itemsize
    found = np.empty((len(rows), dim), dtype=np.float32)
    with open(embeddings.filename, "rb") as f:
        for i, row in enumerate(rows):
            f.seek(embeddings.offset + int(row) * row_bytes)
            found[i] = np.frombuffer(f.read(row_bytes), embeddings.dtype)
    return found


def part_catalog_path(directory, rank):
    return os.path.join(directory, f"catalog.parquet.rank{rank}.part")


class CatalogPart:
    """One process's catalogue rows (catalog_row), streamed to a Parquet part beside the outputs every `flush_every`
    rows, so that the text of the catalogue is never held whole. Kept in memory: the dataset position and the anomaly
    ratio (anomaly_ratios) of each row, 8 bytes; `close` gives them with the part's path and row count."""

    def __init__(self, directory, rank=0, flush_every=8192):
        self.path, self.flush_every = part_catalog_path(directory, rank), flush_every
        self.pending, self.positions, self.kept, self.writer, self.rows = [], [], [], None, 0
        if os.path.exists(self.path):  # an earlier run's, stopped before rank 0 joined it
            os.remove(self.path)

    def append(self, row, position):
        self.pending.append(row)
        self.positions.append(position)
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        schema = self.writer.schema if self.writer else None
        table = pa.Table.from_pylist(self.pending, schema=schema)
        self.writer = self.writer or pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)
        mse, baseline = table.column("mse").to_numpy(), table.column("mse_time_mean").to_numpy()
        self.kept.append((np.array(self.positions, dtype=np.int32), anomaly_ratios(mse, baseline)))
        self.rows += len(self.pending)
        self.pending, self.positions = [], []

    def close(self):
        """{"path": the part (None when no row was appended), "rows", "position": (rows,), "ratio": (rows,)}."""
        self.flush()
        if self.writer:
            self.writer.close()
        positions, ratios = zip(*self.kept) if self.kept else ([np.zeros(0, np.int32)], [np.zeros(0, np.float32)])
        path = self.path if self.rows else None
        return {"path": path, "rows": self.rows, "position": np.concatenate(positions), "ratio": np.concatenate(ratios)}


def anomaly_ratios(mse, mse_time_mean):
    """float32 mse / mse_time_mean, what anomaly_rank orders (highest first); NaN (a model output that is not finite)
    becomes -inf, ranked last as a sort of NaN would."""
    ratios = (mse / np.maximum(mse_time_mean, 1e-12)).astype(np.float32)
    ratios[np.isnan(ratios)] = -np.inf
    return ratios


class Catalogue:
    """The catalogue parts of every process joined in rank order (rank 0, after the loop): the rows stay in the
    parts on disk, read a row group at a time (`tables`); `position` and `ratio` of every row are in memory."""

    def __init__(self, parts):
        self.paths = [part["path"] for part in parts if part["rows"]]
        self.position = np.concatenate([part["position"] for part in parts])
        self.ratio = np.concatenate([part["ratio"] for part in parts])

    def __len__(self):
        return len(self.position)

    def tables(self):
        """pyarrow tables of the rows, in order, as they were written (a few thousand rows each)."""
        for path in self.paths:
            part = pq.ParquetFile(path)
            for group in range(part.num_row_groups):
                yield part.read_row_group(group)

    def remove(self):
        for path in self.paths:
            if os.path.exists(path):
                os.remove(path)


def row_groups(tables, size):
    """The rows of `tables` (pyarrow tables one after another) again, as tables of `size` rows (the last fewer)."""
    held, count = [], 0
    for table in tables:
        held.append(table)
        count += len(table)
        while count >= size:
            joined = pa.concat_tables(held)
            yield joined.slice(0, size)
            held, count = [joined.slice(size)], count - size
    if count:
        yield pa.concat_tables(held)


def write_catalog(directory, tables, added=()):
    """catalog.parquet from `tables` (pyarrow tables of catalogue rows, in order) and the `added` columns (cluster,
    map, rank: an iterable of {name: array} blocks of rows in order, of any size), in CATALOG_COLUMNS order and row
    groups of CATALOG_ROW_GROUP rows; then, up to CSV_MAX_ROWS rows, catalog.csv from it. Each atomically, a row group
    at a time. Beyond CSV_MAX_ROWS a catalog.csv left by an earlier run into the same directory is removed: it would
    describe other rows."""
    parquet, rows, blocks = os.path.join(directory, "catalog.parquet"), [0], ColumnBlocks(added)

    def write_parquet(f):
        writer = None
        for table in row_groups(tables, CATALOG_ROW_GROUP):
            rows[0] += len(table)
            for name, values in blocks.take(len(table)).items():
                table = table.append_column(name, pa.array(values))
            table = table.select(CATALOG_COLUMNS)
            writer = writer or pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
        writer.close()

    atomic_write(parquet, write_parquet)
    write_csv_copy(directory, rows[0])


class ColumnBlocks:
    """Blocks of columns ({name: array}, rows in order) taken again `n` rows at a time, whatever the blocks' sizes."""

    def __init__(self, blocks):
        self.blocks, self.held = iter(blocks), {}

    def take(self, n):
        while len(next(iter(self.held.values()), ())) < n:
            block = next(self.blocks, None)
            if block is None:
                break
            self.held = {name: np.concatenate([self.held[name], v]) if self.held else v for name, v in block.items()}
        taken = {name: values[:n] for name, values in self.held.items()}
        self.held = {name: values[n:] for name, values in self.held.items()}
        return taken


def write_csv_copy(directory, n_rows):
    """catalog.csv: catalog.parquet as text, read a row group at a time, where it has at most CSV_MAX_ROWS rows."""
    csv_path = os.path.join(directory, "catalog.csv")
    if n_rows > CSV_MAX_ROWS:
        if os.path.exists(csv_path):
            os.remove(csv_path)
        return

    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CATALOG_COLUMNS)
        for batch in pq.ParquetFile(os.path.join(directory, "catalog.parquet")).iter_batches(CATALOG_ROW_GROUP):
            writer.writerows(zip(*(batch.column(name).to_pylist() for name in CATALOG_COLUMNS)))
        text.flush()
        text.detach()

    atomic_write(csv_path, write)


class CatalogueReader:
    """embed.py's catalogue read on demand, whatever its length: catalog.parquet's rows by number (only the row groups
    that hold them are decoded) and the first row of a path (the path column alone). Outputs without a Parquet file
    (an older embed.py) are read from catalog.csv whole, every value as text. FileNotFoundError where neither is."""

    def __init__(self, directory):
        parquet = os.path.join(directory, "catalog.parquet")
        if os.path.exists(parquet) or not os.path.exists(os.path.join(directory, "catalog.csv")):
            self.file, self.table = pq.ParquetFile(parquet, read_dictionary=["path"]), None
            sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        else:
            text = pa_csv.ConvertOptions(column_types=dict.fromkeys(CATALOG_COLUMNS, pa.string()))
            self.file, self.table = None, pa_csv.read_csv(os.path.join(directory, "catalog.csv"), convert_options=text)
            sizes = [self.table.num_rows]
        self.group_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def __len__(self):
        return int(self.group_start[-1])

    def rows(self, numbers, columns=None):
        """{row number: {column: value}} of the rows `numbers` (any order, repeats allowed); of `columns` alone where
        given (the others are not decoded)."""
        numbers = np.unique(np.asarray(numbers, dtype=np.int64))
        groups = np.searchsorted(self.group_start, numbers, side="right") - 1
        found = {}
        for group in np.unique(groups):
            table = self.table if self.file is None else self.file.read_row_group(int(group), columns=columns)
            table = table.select(columns) if columns else table
            wanted = numbers[groups == group]
            found |= dict(zip(wanted.tolist(), table.take(wanted - self.group_start[group]).to_pylist()))
        return found

    def batches(self, columns):
        """(first row, pyarrow RecordBatch of `columns`) of every row group, in order."""
        if self.file is None:
            batches = self.table.select(columns).to_batches()
        else:
            batches = self.file.iter_batches(CATALOG_ROW_GROUP, columns=columns)
        start = 0
        for batch in batches:
            yield start, batch
            start += batch.num_rows

    def first_rows(self, paths):
        """{path: its first row} of those of `paths` that the catalogue holds."""
        if not paths:  # row numbers alone: the path column is not read
            return {}
        if self.file is None:
            column = pc.dictionary_encode(self.table.column("path"))
        else:
            column = self.file.read(columns=["path"]).column("path")  # dictionary-encoded (read_dictionary)
        found, offset = {}, 0
        for chunk in column.chunks:  # each: positions (indices) into its own dictionary of distinct paths
            for path in set(paths) - set(found):
                code = pc.index(chunk.dictionary, path).as_py()
                at = pc.index(chunk.indices, code).as_py() if code != -1 else -1
                if at >= 0:
                    found[path] = offset + at
            offset += len(chunk)
        return found
