"""Embed every recording with a trained model: catalogue, clusters, map, anomalies, projector, label scores.

    python embed.py checkpoints/<run>/best_model.pt                      # the shipped data -> embeddings/<run>/
    python embed.py checkpoints/<run>/best_model.pt --labels station     # + how well it separates stations
    python embed.py checkpoints/<run>/best_model.pt --data_dir windows --labels windows/labels.csv

Model, STFT and normalisation settings and channel families come from the checkpoint; data is read through
SeismicSTFTDataset (same index, cache and skip rules as training). Outputs (README, "Embeddings"): embeddings.npy,
catalog.csv (same row order), clusters.json, embedding.json, figures, projector/ (tensorboard --logdir OUTPUT_DIR),
labels.json with --labels.
"""

import argparse
import csv
import io
import logging
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from batching import LengthBatchSampler
from checkpoints import data_settings, model_from_checkpoint
from embedding import CATALOG_COLUMNS, DEFAULT_POOLING, POOLINGS, EmbeddingWriter, catalog_row, encode_batch
from figures import plot_clusters_over_time, plot_map, plot_reconstruction, plot_spectrogram_row
from representation import chance_scores, cluster, compared_features, label_scores, reduce
from runtime import RunError, add_window_flags, chosen_windows, device_and_checkpoint, model_input, script_parser
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate
from storage import atomic_write, write_json_atomic
from vector_index import build_for as build_vector_index

log = logging.getLogger("embed")
LABEL_COLUMNS = ("network", "station", "location", "family", "trace_id")  # catalogue columns --labels accepts
NEAREST_SHOWN = 6  # members nearest each cluster centre: listed in clusters.json and drawn
THUMBNAIL = 32  # projector thumbnails: THUMBNAIL x THUMBNAIL pixels of the Z spectrogram
LABEL_SAMPLE = 5_000  # labelled recordings scored by --labels (leave-one-out over all rows costs N^2)


def parse_args(argv=None):
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("checkpoint", help="checkpoint written by train.py (best_model.pt, last.pt, checkpoint_epoch_N.pt)")
    add("--data_dir", help="directory of miniSEED files; None: the data_dir stored in the checkpoint")
    add(
        "--split",
        choices=("all", "val", "train"),
        default="all",
        help="'all': every usable file of --data_dir; 'val' / 'train': the run's validation / training files",
    )
    add("--output_dir", help="where the outputs go; None: embeddings/<run name of the checkpoint>")
    add("--batch_size", type=int, default=32, help="spectrograms per forward pass")
    add("--num_workers", type=int, default=0, help="DataLoader worker processes (0 = load in the main process)")
    add("--device", default="auto", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    add("--cache_dir", help="spectrogram cache as in train.py; None: read the miniSEED files")
    add_window_flags(parser, "embed")
    add("--pooling", choices=tuple(POOLINGS), default=DEFAULT_POOLING, help="how the latent becomes one vector")
    add("--clusters", type=clusters_flag, default="auto", help="K of KMeans, >= 2, or 'auto' (best silhouette)")
    add(
        "--labels",
        help="catalogue column (network, station, location, family, trace_id) or CSV of path,label; None: no scores",
    )
    add("--num_anomalies", type=int, default=5, help="figures of the most anomalous recordings")
    add("--projector_points", type=int, default=2000, help="recordings in the TensorBoard projector (0 = none)")
    add("--seed", type=int, default=0, help="seed of clustering, samples and the map")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0 or args.num_anomalies < 0 or args.projector_points < 0:
        parser.error("--batch_size must be >= 1; --num_workers, --num_anomalies, --projector_points >= 0")
    return parser, args


def clusters_flag(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 or 'auto', got '{text}'")
    return int(text)


def main(argv=None):
    """Embed; returns a summary dict (output_dir, rows, k, label scores)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser, args = parse_args(argv)
    try:
        return embed(args)
    except (FileNotFoundError, RunError) as err:
        parser.exit(2, f"error: {err}\n")


def load(args):
    """(model in eval mode, checkpoint, data settings, device) or RunError."""
    device, checkpoint = device_and_checkpoint(args.device, args.checkpoint)
    return model_from_checkpoint(checkpoint, device).eval(), checkpoint, data_settings(checkpoint), device


def read_labels(spec, dataset, positions):
    """--labels -> (name, {position: label} or None for a catalogue column)."""
    if spec in LABEL_COLUMNS:
        return spec, None
    if not os.path.isfile(spec):
        raise RunError(f"--labels {spec}: neither a catalogue column ({', '.join(LABEL_COLUMNS)}) nor a CSV file")
    with open(spec, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise RunError(f"--labels {spec}: needs a header line with columns path,label")
    label_of = {row["path"]: row["label"] for row in rows}
    found = {i: label_of[f] for i, f in zip(positions, dataset.sample_files(positions)) if f in label_of}
    if not found:
        raise RunError(f"--labels {spec}: none of its paths is a usable file of {dataset.data_dir}")
    return os.path.basename(spec), found


def embed(args):
    model, checkpoint, settings, device = load(args)
    data_dir, stft = args.data_dir or settings["data_dir"], settings["stft"]
    skips = SkipLog()
    window_seconds, window_stride = chosen_windows(args, settings)
    dataset = SeismicSTFTDataset(
        data_dir,
        settings["families"],
        stft,
        settings["extensions"],
        skips=skips,
        cache_dir=args.cache_dir,
        window_seconds=window_seconds,
        window_stride=window_stride,
    )
    positions = dataset.split_positions(args.split, settings["split_by"], settings["val_groups"]).tolist()
    if not positions:
        raise RunError(
            f"no usable files of families {' '.join(settings['families'])} for --split {args.split} in {data_dir}"
        )
    labels = read_labels(args.labels, dataset, positions) if args.labels else None
    output_dir = args.output_dir or os.path.join("embeddings", checkpoint["run_name"])
    os.makedirs(output_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    projector_keep = set(rng.permutation(positions)[: args.projector_points].tolist())
    label_keep = set()
    if labels:
        labelled = positions if labels[1] is None else sorted(labels[1])
        label_keep = set(rng.permutation(labelled)[:LABEL_SAMPLE].tolist())
    label_bins = int(np.median(dataset.time_bins()[sorted(label_keep)])) if label_keep else 0
    keep = (projector_keep, label_keep, label_bins)
    passed = embed_files(model, dataset, positions, args, device, output_dir, keep)
    if not passed["rows"]:
        raise RunError(f"none of the {len(positions)} chosen files could be read (see the warnings above)")
    embeddings = np.load(os.path.join(output_dir, "embeddings.npy"), mmap_mode="r")
    build_vector_index(output_dir)  # index.faiss beside embeddings.npy, which similar.py searches (vector_index.py)
    rows = passed["rows"]
    remove_stale_outputs(output_dir)
    describe_clusters(embeddings, rows, args, output_dir, dataset, stft)
    write_catalog(os.path.join(output_dir, "catalog.csv"), rows)
    plot_outputs(rows, model, dataset, stft, args, output_dir, device)
    write_projector(embeddings, rows, passed["thumbnails"], output_dir)
    summary = {"output_dir": output_dir, "rows": len(rows), "dim": int(embeddings.shape[1])}
    write_json_atomic(
        os.path.join(output_dir, "embedding.json"),
        {
            "checkpoint": os.path.abspath(args.checkpoint),
            "data_dir": os.path.abspath(data_dir),
            "split": args.split,
            "pooling": args.pooling,
            "window_seconds": window_seconds,
            "window_stride": window_stride,
            "rows": len(rows),
            "dim": int(embeddings.shape[1]),
            "skipped": skips.summary(),
        },
    )
    if labels:
        summary["labels"] = score_labels(embeddings, rows, labels, passed["spectrograms"], args, output_dir)
    print(
        f"{len(rows)} recordings embedded ({embeddings.shape[1]} values each, pooling {args.pooling}) in {output_dir}"
    )
    print(f"skipped files: {skips.describe()}")
    return summary


def remove_stale_outputs(output_dir):
    """Outputs of an earlier run into the same directory that this run may not write again (anomaly and cluster
    figures are numbered; labels.json only comes with --labels)."""
    for name in os.listdir(output_dir):
        if (name.startswith(("anomaly_", "cluster_")) and name.endswith(".png")) or name == "labels.json":
            os.remove(os.path.join(output_dir, name))


@torch.no_grad()
def embed_files(model, dataset, positions, args, device, output_dir, keep):
    """One pass in batches of one length: embeddings.npy streamed, catalogue rows, and the projector thumbnails and
    label spectrograms of the rows in `keep` = (projector positions, label positions, label time bins)."""
    projector_keep, label_keep, label_bins = keep
    sampler = LengthBatchSampler(dataset.time_bins(), args.batch_size, positions)
    workers = dict(num_workers=args.num_workers, persistent_workers=False) if args.num_workers else {}
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate, **workers)
    writer = EmbeddingWriter(os.path.join(output_dir, "embeddings.npy"))
    rows, thumbnails, spectrograms = [], {}, {}
    for batch in loader:
        dataset.skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is None:
            continue
        x, mask = model_input(batch["spectrogram"], device), batch["mask"].to(device)
        vectors, mse, mse_time_mean = encode_batch(model, x, mask, args.pooling)
        writer.append(vectors)
        for k, meta in enumerate(batch["meta"]):
            relpath = os.path.relpath(meta["path"], dataset.data_dir)
            position = meta["index"]
            duration = float(dataset.sample_seconds(position))
            rows.append({**catalog_row(meta, relpath, duration, mse[k], mse_time_mean[k]), "position": position})
            valid = x[k, :, :, : int(mask[k].sum())].float().cpu()
            if position in projector_keep:
                thumbnails[len(rows) - 1] = thumbnail(valid)
            if position in label_keep:
                spectrograms[len(rows) - 1] = F.interpolate(valid[None], size=(valid.shape[1], label_bins))[0].numpy()
    writer.close()
    return {"rows": rows, "thumbnails": thumbnails, "spectrograms": spectrograms}


def thumbnail(spectrogram):
    """(3, F, T) -> (3, THUMBNAIL, THUMBNAIL) grey image of the Z component, low frequencies at the bottom."""
    z = F.interpolate(spectrogram[None, 2:3], size=(THUMBNAIL, THUMBNAIL), mode="area")[0]
    return z.flip(-2).expand(3, -1, -1).clone()


def describe_clusters(embeddings, rows, args, output_dir, dataset, stft):
    """Cluster, map and anomaly columns into `rows`; clusters.json; one figure of each cluster's nearest members."""
    if args.clusters != "auto" and args.clusters > len(rows):
        raise RunError(f"--clusters {args.clusters}: more clusters than the {len(rows)} recordings embedded")
    if len(rows) < 3:
        raise RunError(f"{len(rows)} recordings embedded: clustering needs at least 3")
    pipeline, reduced = reduce(embeddings, args.seed)
    labels, distances, description = cluster(reduced, args.clusters, args.seed)
    ratio = np.array([row["mse"] / max(row["mse_time_mean"], 1e-12) for row in rows])
    anomaly_rank = np.empty(len(rows), dtype=int)
    anomaly_rank[np.argsort(-ratio, kind="stable")] = np.arange(1, len(rows) + 1)
    map_xy = reduced[:, :2] if reduced.shape[1] >= 2 else np.pad(reduced, ((0, 0), (0, 1)))
    for row, label, distance, rank, (x, y) in zip(rows, labels, distances, anomaly_rank, map_xy):
        row.update(cluster=int(label), cluster_distance=float(distance), anomaly_rank=int(rank))
        row.update(map_x=float(x), map_y=float(y))
    description["clusters"] = [cluster_summary(rows, labels, distances, c) for c in range(description["k"])]
    write_json_atomic(os.path.join(output_dir, "clusters.json"), description)
    for c, summary in enumerate(description["clusters"]):
        members = [rows[i] for i in summary["nearest_rows"]]
        spectrograms = [dataset[row["position"]][0].float().numpy() for row in members]
        titles = [f"{row['trace_id']}\n{row['starttime'][:19]}" for row in members]
        title = f"cluster {c}: {summary['size']} recordings; the {len(members)} nearest its centre"
        save_figure(
            plot_spectrogram_row(spectrograms, titles, stft, title), os.path.join(output_dir, f"cluster_{c}.png")
        )
    log.info("%s: K = %d (%s)", description["method"], description["k"], description["k_chosen_by"])


def cluster_summary(rows, labels, distances, c):
    members = np.flatnonzero(labels == c)
    nearest = members[np.argsort(distances[members], kind="stable")[:NEAREST_SHOWN]]
    times = sorted(rows[i]["starttime"] for i in members)

    def counts(column):
        values, n = np.unique([rows[i][column] for i in members], return_counts=True)
        return {str(v): int(k) for v, k in sorted(zip(values, n), key=lambda item: -item[1])}

    return {
        "cluster": c,
        "size": len(members),
        "families": counts("family"),
        "stations": counts("station"),
        "networks": counts("network"),
        "first": times[0] if times else None,
        "last": times[-1] if times else None,
        "nearest_rows": nearest.tolist(),
        "nearest": [rows[i]["path"] for i in nearest],
    }


def write_catalog(path, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, CATALOG_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def save_figure(figure, path):
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=80))


@torch.no_grad()
def plot_outputs(rows, model, dataset, stft, args, output_dir, device):
    """map.png; anomaly_<rank>_<file>.png of the most anomalous recordings; clusters_over_time.png if > 1 day."""
    xy = np.array([[row["map_x"], row["map_y"]] for row in rows])
    colourings = {
        "coloured by cluster": np.array([row["cluster"] for row in rows]),
        "coloured by channel family": np.array([row["family"] for row in rows]),
    }
    save_figure(plot_map(xy, colourings), os.path.join(output_dir, "map.png"))
    for row in sorted(rows, key=lambda row: row["anomaly_rank"])[: args.num_anomalies]:
        x = dataset[row["position"]][0].float()[None].to(device)
        reconstruction = model(x)[0].cpu().numpy()
        file_id = os.path.splitext(os.path.basename(row["path"]))[0]
        ratio = row["mse"] / row["mse_time_mean"]
        title = f"anomaly {row['anomaly_rank']}: {file_id}, MSE {ratio:.2f} x the time-mean baseline's"
        figure = plot_reconstruction(x[0].cpu().numpy(), reconstruction, stft, title)
        save_figure(figure, os.path.join(output_dir, f"anomaly_{row['anomaly_rank']}_{file_id}.png"))
    times = np.array([np.datetime64(row["starttime"].rstrip("Z")) for row in rows]).astype("datetime64[s]")
    over_time = os.path.join(output_dir, "clusters_over_time.png")
    if times.max() - times.min() > np.timedelta64(1, "D"):
        save_figure(plot_clusters_over_time(times, colourings["coloured by cluster"]), over_time)
    elif os.path.exists(over_time):
        os.remove(over_time)


def write_projector(embeddings, rows, thumbnails, output_dir):
    """projector/: TensorBoard's embedding projector of the rows with thumbnails (built aside, then swapped in)."""
    final, building = os.path.join(output_dir, "projector"), os.path.join(output_dir, ".projector.tmp")
    shutil.rmtree(building, ignore_errors=True)
    if thumbnails:
        chosen = sorted(thumbnails)
        metadata = [[str(rows[i][c]) for c in CATALOG_COLUMNS] for i in chosen]
        with SummaryWriter(building) as writer:
            writer.add_embedding(
                torch.from_numpy(np.asarray(embeddings[chosen])),
                metadata=metadata,
                metadata_header=list(CATALOG_COLUMNS),
                label_img=torch.stack([thumbnails[i] for i in chosen]),
                tag="embeddings",
            )
    shutil.rmtree(final, ignore_errors=True)
    if thumbnails:
        os.replace(building, final)


def score_labels(embeddings, rows, labels, spectrograms, args, output_dir):
    """Leave-one-out k-NN accuracy, precision@k and silhouette of the labels for the embedding and two baselines of
    the same dimension; printed, and written to labels.json."""
    name, label_of = labels
    chosen = sorted(spectrograms)
    values = [rows[i][name] if label_of is None else label_of[rows[i]["position"]] for i in chosen]
    if len(set(values)) < 2:
        raise RunError(f"--labels {args.labels}: the embedded recordings hold fewer than 2 different labels")
    spectra = np.stack([spectrograms[i] for i in chosen])
    compared = compared_features(np.asarray(embeddings[chosen]), spectra, args.seed)
    candidates = {f"model ({args.pooling})": compared.pop("model"), **compared}
    table = {who: {"dim": int(f.shape[1]), **label_scores(f, values, args.seed)} for who, f in candidates.items()}
    counts = dict(zip(*np.unique(values, return_counts=True)))
    result = {"labels": name, "recordings": len(chosen), "counts": {str(k): int(v) for k, v in counts.items()}}
    result["scores"], result["chance"] = table, chance_scores(values)
    write_json_atomic(os.path.join(output_dir, "labels.json"), result)
    print(f"labels {name}: {len(chosen)} recordings, {len(counts)} labels; leave-one-out 5-NN, standardised features")
    print(f"{'representation':34} {'dim':>5} {'5-NN acc':>9} {'prec@5':>7} {'silhouette':>10}")
    for who, s in table.items():
        print(f"{who:34} {s['dim']:5d} {s['knn_accuracy']:9.3f} {s['precision_at_k']:7.3f} {s['silhouette']:10.3f}")
    chance = result["chance"]
    print(f"{'chance (the labels alone)':34} {'':5} {chance['knn_accuracy']:9.3f} {chance['precision_at_k']:7.3f}")
    return result


if __name__ == "__main__":
    main()
