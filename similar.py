"""The recordings most similar to given ones, from the outputs of embed.py.

    python similar.py embeddings/<run> 12                                  # catalogue row 12 (0 = the first row)
    python similar.py embeddings/<run> NC.MDPB.HH.20100203T015406.mseed    # a path of the catalogue
    python similar.py embeddings/<run> /new/file.mseed -k 5                # a new file, encoded with the same model
    python similar.py embeddings/<run> 12 40 /new/file.mseed               # several queries: one table
    python similar.py embeddings/<run> --queries queries.txt --table near.csv   # a query a line (row, path or file)

Distances are Euclidean between standardised embeddings (each value scaled to zero mean and unit variance over the
catalogue), the space of embed.py's label scores. The search uses the index embed.py wrote beside the embeddings
(vector_index.py: exact up to 11.5 million rows x values, IVF beyond, candidates re-ranked exactly); outputs of an
older embed.py, without one, get an index built in memory. Prints the neighbours, writes them for all queries into
one CSV table (query, query_row, rank, row, distance, the catalogue's columns) and, for a single query (or with
--figures), a figure of each query and its neighbours (Z spectrograms).
"""

import argparse
import csv
import io
import json
import logging
import os

import numpy as np
import torch

from embedding import vector_index
from embedding.catalogue import CatalogueReader
from embedding.figures import plot_spectrogram_row, sample_name, save_figure
from embedding.poolings import encode_batch
from reading.transform import spectrogram
from reading.waveforms import UnusableFile, read_waveform
from running.checkpoints import data_settings, model_from_checkpoint
from running.device import device_and_checkpoint
from running.settings import RunError, Setting, at_least, device_setting, parse
from running.storage import atomic_write
from stft_dataset import SeismicSTFTDataset

log = logging.getLogger("similar")
SHOWN_COLUMNS = {"path": 40, "trace_id": 14, "starttime": 27, "cluster": 7}  # printed columns and their widths
PRINTED_QUERIES = 10  # queries whose neighbours are printed; the table holds all
TABLE_COLUMNS = ("query", "query_row", "rank", "row", "distance")  # then the catalogue's columns


SETTINGS = (
    Setting("embeddings_dir", None, "output directory of embed.py (embeddings.npy, catalog.parquet, index.faiss)",
            positional=True),
    Setting("query", None, "catalogue row numbers, catalogue paths or miniSEED files (any mix)", nargs="*",
            positional=True),
    Setting("queries", None, "text file of more queries, one a line ('#' starts a comment)", metavar="FILE"),
    Setting("k", 10, "neighbours to list per query", int, check=at_least(1), flag="-k"),
    Setting("data_dir", None, "where the catalogue's files are (default: the data_dir embed.py read)"),
    Setting("table", None, "CSV of every query's neighbours (default: EMBEDDINGS_DIR/similar[_<query>].csv)"),
    Setting("figures", None, "a figure of each query and its neighbours (default: for a single query only)",
            action=argparse.BooleanOptionalAction),
    Setting("output", None, "the figure of a single query (default: EMBEDDINGS_DIR/similar_<query>.png)"),
    device_setting("encode new files (and search) on"),
)  # fmt: skip


def parse_args(argv=None):
    parser, args = parse(__doc__, SETTINGS, argv)
    args.query = args.query + (read_query_file(args.queries, parser) if args.queries else [])
    if not args.query:
        parser.error("no query: give catalogue rows, paths or files, or --queries FILE")
    if args.output and len(args.query) > 1:
        parser.error(f"--output names the figure of a single query; {len(args.query)} queries given")
    if args.figures is None:
        args.figures = len(args.query) == 1
    return parser, args


def read_query_file(path, parser):
    try:
        with open(path) as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError as err:
        parser.error(f"--queries {path}: {err.strerror}")
    return [line for line in lines if line]


def main(argv=None):
    """Search; returns the neighbours of every query, nearest first: catalogue rows (dicts) with "query",
    "query_row", "rank", "row" and "distance"."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser, args = parse_args(argv)
    try:
        return search(args)
    except (FileNotFoundError, RunError) as err:
        parser.exit(2, f"error: {err}\n")


def load_outputs(directory):
    """(embeddings memmap, catalogue (embedding.CatalogueReader: rows read on demand), settings of embed.py) or
    RunError."""
    paths = [os.path.join(directory, name) for name in ("embeddings.npy", "catalog.parquet", "embedding.json")]
    if not os.path.exists(paths[1]):  # an older embed.py wrote catalog.csv alone
        paths[1] = os.path.join(directory, "catalog.csv")
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise RunError(f"{directory} holds no outputs of embed.py (missing {', '.join(missing)})")
    embeddings = np.load(paths[0], mmap_mode="r")
    catalogue = CatalogueReader(directory)
    if len(catalogue) != len(embeddings):
        raise RunError(f"{directory}: the catalogue has {len(catalogue)} rows, embeddings.npy {len(embeddings)}")
    with open(paths[2]) as f:
        return embeddings, catalogue, json.load(f)


def query_rows(queries, catalogue):
    """The catalogue row each query names (the first row of a catalogue path), or None for a file outside it."""
    first_row = catalogue.first_rows([query for query in queries if not query.isdigit()])
    rows = []
    for query in queries:
        if query.isdigit() and int(query) >= len(catalogue):
            raise RunError(f"row {query}: the catalogue has {len(catalogue)} rows (0 to {len(catalogue) - 1})")
        row = int(query) if query.isdigit() else first_row.get(query)
        if row is None and not os.path.isfile(query):
            raise RunError(f"{query}: neither a catalogue row or path nor a file")
        rows.append(row)
    return rows


def read_spectrogram(path, data):
    """((3, F, T) spectrogram, the file's own sampling rate in Hz) of a new file as the checkpoint's run read it, or
    RunError naming the file and reason."""
    try:
        waveform, meta = read_waveform(path, data["families"], data["stft"])
    except UnusableFile as err:
        raise RunError(f"{path}: {err}") from None
    return spectrogram(waveform, data["stft"], meta["native_rate"]), meta["native_rate"]


def catalogue_reader(settings, data, data_dir):
    """catalogue row -> ((3, F, T) spectrogram, its own sampling rate in Hz) of that recording, read as embed.py read
    it, through the dataset's index: a file, the files of a per-channel recording (the row names its first), a
    SeisBench trace, or with windows (embedding.json's window_seconds) the window that starts at the row's start."""
    windows = {"window_seconds": settings.get("window_seconds"), "window_stride": settings.get("window_stride")}
    dataset = SeismicSTFTDataset(data_dir, data["families"], data["stft"], data["extensions"], **windows)

    def read(row):
        position = dataset.position_of(row["path"], row["starttime"])
        x, meta = dataset[position] if position is not None else (None, {"message": f"not in {data_dir}"})
        if x is None:
            raise RunError(f"{row['path']}@{row['starttime']}: {meta['message']}")
        return x.float().numpy(), meta["native_rate"]

    return read


@torch.no_grad()
def encode_file(model, spectrogram_, pooling, device):
    """(1, D) embedding of a new file's spectrogram with the model and pooling that embed.py used."""
    x = torch.from_numpy(spectrogram_)[None].to(device)
    embedding, _, _ = encode_batch(model, x, torch.ones(1, x.shape[-1], dtype=torch.bool, device=device), pooling)
    return embedding


def query_vectors(queries, rows, embeddings, checkpoint, settings, device):
    """(Q, D) embeddings of the queries: the catalogue's for its rows, new files encoded with the checkpoint."""
    data, model = data_settings(checkpoint), None
    vectors = []
    for query, row in zip(queries, rows):
        if row is not None:
            vectors.append(np.asarray(embeddings[row : row + 1], dtype=np.float32))
            continue
        model = model or model_from_checkpoint(checkpoint, device).eval()
        # Rounded as embed.py stores its rows: a file of the catalogue then finds its own row at distance 0.
        encoded = encode_file(model, read_spectrogram(query, data)[0], settings["pooling"], device)
        vectors.append(np.asarray(encoded, dtype=embeddings.dtype).astype(np.float32))
    return np.concatenate(vectors)


def searchable(directory, embeddings, device):
    """The index embed.py wrote, or (outputs of an older embed.py) one built in memory."""
    index = vector_index.load(directory, len(embeddings), "cuda" if device.type == "cuda" else "cpu")
    if index is None:
        log.info(
            "%s has no index of its %d rows (embed.py writes one): building it in memory", directory, len(embeddings)
        )
        index = vector_index.build(embeddings)
    return index


def search(args):
    embeddings, catalogue, settings = load_outputs(args.embeddings_dir)
    rows = query_rows(args.query, catalogue)
    device, checkpoint = device_and_checkpoint(args.device, settings["checkpoint"])
    vectors = query_vectors(args.query, rows, embeddings, checkpoint, settings, device)
    distances, found = searchable(args.embeddings_dir, embeddings, device).search(vectors, args.k + 1, embeddings)
    results = []  # (query, its catalogue row or None, [(row, distance) of its neighbours, nearest first])
    for query, row, near, distance in zip(args.query, rows, found, distances):
        results.append(
            (query, row, [(int(r), float(d)) for r, d in zip(near, distance) if r != row and r >= 0][: args.k])
        )
    shown = [row for _, row, _ in results if row is not None] + [r for _, _, near in results for r, _ in near]
    catalog = catalogue.rows(shown)  # {row: columns} of the queries' and neighbours' rows alone
    table = [
        {"query": query, "query_row": row, "rank": rank, "row": r, "distance": d, **catalog[r]}
        for query, row, neighbours in results
        for rank, (r, d) in enumerate(neighbours, 1)
    ]
    print_neighbours(results, catalog)
    write_table(table_path(args, rows, catalog, settings), table)
    if args.figures:
        draw_figures(args, results, checkpoint, settings, catalog)
    return table


def query_name(query, row, catalog):
    return catalog[row]["path"] if row is not None else os.path.basename(query)


def figure_name(query, row, catalog, settings):
    """What names a query's figure and table: its catalogue row's sample (figures.sample_name: a window of a longer
    recording with its start), or a new file's name."""
    if row is None:
        return sample_name(query)
    windowed = settings.get("window_seconds")
    return sample_name(catalog[row]["path"], catalog[row]["starttime"] if windowed else None)


def print_neighbours(results, catalog):
    for query, row, neighbours in results[:PRINTED_QUERIES]:
        where = f"catalogue row {row}" if row is not None else "new file"
        print(f"query: {query_name(query, row, catalog)} ({where})")
        print(f"{'row':>6} {'distance':>9}  " + "  ".join(f"{c:{w}}" for c, w in SHOWN_COLUMNS.items()))
        for r, d in neighbours:
            print(f"{r:6d} {d:9.3f}  " + "  ".join(f"{catalog[r][c]:{w}}" for c, w in SHOWN_COLUMNS.items()))
    if len(results) > PRINTED_QUERIES:
        print(f"... and {len(results) - PRINTED_QUERIES} more queries (the table holds all)")


def table_path(args, rows, catalog, settings):
    if args.table:
        return args.table
    if len(args.query) > 1:
        return os.path.join(args.embeddings_dir, "similar.csv")
    return os.path.join(args.embeddings_dir, f"similar_{figure_name(args.query[0], rows[0], catalog, settings)}.csv")


def write_table(path, table):
    """One CSV of every query's neighbours, written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, list(table[0]) if table else TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    print(f"table: {path} ({len(table)} neighbours)")


def panel_title(row):
    """A catalogue row in a figure: its trace and start (a file name alone loses the station in a narrow panel)."""
    return f"{row['trace_id']} {str(row['starttime'])[:19]}"


def draw_figures(args, results, checkpoint, settings, catalog):
    """A figure of each query and its neighbours (Z spectrograms): --output, or EMBEDDINGS_DIR/similar_<query>.png."""
    data, data_dir = data_settings(checkpoint), args.data_dir or settings["data_dir"]
    read_catalogued = catalogue_reader(settings, data, data_dir)
    for query, row, neighbours in results:
        name = figure_name(query, row, catalog, settings)
        query_read = read_catalogued(catalog[row]) if row is not None else read_spectrogram(query, data)
        spectrograms, rates = zip(query_read, *(read_catalogued(catalog[r]) for r, _ in neighbours))
        titles = [f"query\n{panel_title(catalog[row]) if row is not None else name[-40:]}"]
        titles += [f"{d:.2f}\n{panel_title(catalog[r])}" for r, d in neighbours]
        title = f"the {len(neighbours)} nearest to {name} (distance in standardised units)"
        figure = plot_spectrogram_row(spectrograms, titles, data["stft"], title, rates)
        output = args.output or os.path.join(args.embeddings_dir, f"similar_{name}.png")
        save_figure(figure, output)
        print(f"figure: {output}")


if __name__ == "__main__":
    main()
