"""The recordings most similar to a given one, from the outputs of embed.py.

    python similar.py embeddings/<run> 12                                  # catalogue row 12 (0 = the first row)
    python similar.py embeddings/<run> NC.MDPB.HH.20100203T015406.mseed    # a path of the catalogue
    python similar.py embeddings/<run> /new/file.mseed -k 5                # a new file, encoded with the same model

Distances are Euclidean between standardised embeddings (each value scaled to zero mean and unit variance over the
catalogue), the space of embed.py's label scores; scikit-learn's NearestNeighbors (brute force) searches them.
Prints a table and writes a figure of the query and its neighbours (Z spectrograms).
"""

import csv
import json
import logging
import os

import numpy as np
import torch

from checkpoints import data_settings, model_from_checkpoint
from device import device_and_checkpoint
from embedding import encode_batch
from figures import plot_spectrogram_row
from representation import SearchIndex
from seisbench_data import is_seisbench_dataset
from settings import RunError, Setting, at_least, device_setting, parse
from stft_dataset import SeismicSTFTDataset
from storage import atomic_write
from transform import spectrogram
from waveforms import UnusableFile, read_waveform

log = logging.getLogger("similar")
SHOWN_COLUMNS = {"path": 40, "trace_id": 14, "starttime": 27, "cluster": 7}  # printed columns and their widths


SETTINGS = (
    Setting(
        "embeddings_dir",
        None,
        "output directory of embed.py (embeddings.npy, catalog.csv, embedding.json)",
        positional=True,
    ),
    Setting("query", None, "a catalogue row number, a catalogue path, or a miniSEED file", positional=True),
    Setting("k", 10, "neighbours to list", int, check=at_least(1), flag="-k"),
    Setting("data_dir", None, "where the catalogue's files are (default: the data_dir embed.py read)"),
    Setting("output", None, "figure of the query and its neighbours (default: EMBEDDINGS_DIR/similar_<query>.png)"),
    device_setting("encode a new file on"),
)


def parse_args(argv=None):
    return parse(__doc__, SETTINGS, argv)


def main(argv=None):
    """Search; returns the neighbours: catalogue rows (dicts) with "row" and "distance", nearest first."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser, args = parse_args(argv)
    try:
        return search(args)
    except (FileNotFoundError, RunError) as err:
        parser.exit(2, f"error: {err}\n")


def load_outputs(directory):
    """(embeddings memmap, catalogue rows as dicts, settings of embed.py) or RunError."""
    paths = [os.path.join(directory, name) for name in ("embeddings.npy", "catalog.csv", "embedding.json")]
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise RunError(f"{directory} holds no outputs of embed.py (missing {', '.join(missing)})")
    embeddings = np.load(paths[0], mmap_mode="r")
    with open(paths[1], newline="") as f:
        catalog = list(csv.DictReader(f))
    if len(catalog) != len(embeddings):
        raise RunError(f"{directory}: catalog.csv has {len(catalog)} rows, embeddings.npy {len(embeddings)}")
    with open(paths[2]) as f:
        return embeddings, catalog, json.load(f)


def query_row(query, catalog):
    """The catalogue row a query names, or None for a file that is not in the catalogue."""
    if query.isdigit():
        if int(query) >= len(catalog):
            raise RunError(f"row {query}: the catalogue has {len(catalog)} rows (0 to {len(catalog) - 1})")
        return int(query)
    return next((i for i, entry in enumerate(catalog) if entry["path"] == query), None)


def read_spectrogram(path, data):
    """(3, F, T) spectrogram of a file as the checkpoint's run read it, or RunError naming the file and reason."""
    try:
        waveform, _ = read_waveform(path, data["families"], data["stft"])
    except UnusableFile as err:
        raise RunError(f"{path}: {err}") from None
    return spectrogram(waveform, data["stft"])


def catalogue_reader(settings, data, data_dir):
    """catalogue row -> (3, F, T) spectrogram of that recording, read as embed.py read it: the file, or with windows
    (embedding.json's window_seconds) the window that starts at the row's starttime."""
    if not settings.get("window_seconds") and not is_seisbench_dataset(data_dir):  # a trace is read by its dataset
        return lambda row: read_spectrogram(os.path.join(data_dir, row["path"]), data)
    windows = {"window_seconds": settings.get("window_seconds"), "window_stride": settings.get("window_stride")}
    dataset = SeismicSTFTDataset(data_dir, data["families"], data["stft"], data["extensions"], **windows)

    def read(row):
        position = dataset.position_of(row["path"], row["starttime"])
        x, meta = dataset[position] if position is not None else (None, {"message": f"not in {data_dir}"})
        if x is None:
            raise RunError(f"{row['path']}@{row['starttime']}: {meta['message']}")
        return x.float().numpy()

    return read


@torch.no_grad()
def encode_file(spectrogram_, checkpoint, pooling, device):
    """(1, D) embedding of a new file's spectrogram with the checkpoint and pooling that embed.py used."""
    model = model_from_checkpoint(checkpoint, device).eval()
    x = torch.from_numpy(spectrogram_)[None].to(device)
    embedding, _, _ = encode_batch(model, x, torch.ones(1, x.shape[-1], dtype=torch.bool, device=device), pooling)
    return embedding


def search(args):
    embeddings, catalog, settings = load_outputs(args.embeddings_dir)
    row = query_row(args.query, catalog)
    if row is None and not os.path.isfile(args.query):
        raise RunError(f"{args.query}: neither a catalogue row or path nor a file")
    device, checkpoint = device_and_checkpoint(args.device, settings["checkpoint"])
    data, data_dir = data_settings(checkpoint), args.data_dir or settings["data_dir"]
    read_catalogued = catalogue_reader(settings, data, data_dir)
    if row is None:
        name, query_spectrogram = os.path.basename(args.query), read_spectrogram(args.query, data)
        vector = encode_file(query_spectrogram, checkpoint, settings["pooling"], device)
    else:
        name, vector = catalog[row]["path"], np.asarray(embeddings[row : row + 1])
        query_spectrogram = read_catalogued(catalog[row])
    distances, rows = SearchIndex(embeddings).nearest(vector, args.k + (row is not None))
    neighbours = [(int(r), float(d)) for r, d in zip(rows[0], distances[0]) if r != row][: args.k]
    print(f"query: {name}" + (f" (catalogue row {row})" if row is not None else " (new file)"))
    print(f"{'row':>6} {'distance':>9}  " + "  ".join(f"{c:{w}}" for c, w in SHOWN_COLUMNS.items()))
    for r, d in neighbours:
        print(f"{r:6d} {d:9.3f}  " + "  ".join(f"{catalog[r][c]:{w}}" for c, w in SHOWN_COLUMNS.items()))
    spectrograms = [query_spectrogram] + [read_catalogued(catalog[r]) for r, _ in neighbours]
    titles = [f"query\n{name[-40:]}"] + [f"{d:.2f}\n{catalog[r]['path'][-40:]}" for r, d in neighbours]
    title = f"the {len(neighbours)} nearest to {name} (distance in standardised units)"
    figure = plot_spectrogram_row(spectrograms, titles, data["stft"], title)
    output = args.output or os.path.join(
        args.embeddings_dir, f"similar_{os.path.splitext(os.path.basename(name))[0]}.png"
    )
    atomic_write(output, lambda f: figure.savefig(f, format="png", dpi=80))
    print(f"figure: {output}")
    return [{**catalog[r], "row": r, "distance": d} for r, d in neighbours]


if __name__ == "__main__":
    main()
