"""Embed every recording with a trained model: catalogue, clusters, map, anomalies, projector, label scores.

    python embed.py checkpoints/<run>/best_model.pt                      # the shipped data -> embeddings/<run>/
    python embed.py checkpoints/<run>/best_model.pt --labels station     # + how well it separates stations
    python embed.py checkpoints/<run>/best_model.pt --data_dir windows --labels windows/labels.csv
    python embed.py checkpoints/<run>/best_model.pt --data_dir /data/ETHZ --labels source_magnitude   # SeisBench
    torchrun --standalone --nproc_per_node 4 embed.py checkpoints/<run>/best_model.pt --data_dir /archive

Model, STFT and normalisation settings and channel families come from the checkpoint; data is read through
SeismicSTFTDataset (same index, cache and skip rules as training). Under torchrun each process embeds a contiguous
share of the samples and rank 0 joins them: the outputs are those of one process (shards.py; docs/embeddings.md has
the multi-machine command). Outputs (docs/embeddings.md): embeddings.npy (float16, read memory-mapped),
catalog.parquet and (up to a million rows) catalog.csv, same row order, clusters.json, embedding.json, figures,
projector/ (tensorboard --logdir OUTPUT_DIR), labels.json with --labels.
"""

import argparse
import csv
import logging
import os
import shutil
import time
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from embedding.atlas import ATLAS_DIR, EDGE_SHOWN, NEAREST_SHOWN, draw_clusters, draw_set_aside, write_atlas
from embedding.baselines import blur
from embedding.catalogue import (
    CATALOG_COLUMNS,
    CatalogPart,
    Catalogue,
    CatalogueReader,
    EmbeddingWriter,
    catalog_row,
    merge_parts,
    read_embeddings,
    read_in_chunks,
    read_rows,
    start_times,
    write_catalog,
)
from embedding.figures import plot_clusters_over_time, plot_map, plot_reconstruction, sample_name, save_figure
from embedding.poolings import POOLINGS, READOUT, default_pooling, encode_batch
from embedding.representation import (
    ASSIGN_CHUNK,
    assign_rows,
    chance_scores,
    cluster,
    compared_features,
    fit_sample,
    grouped_chance,
    grouped_label_scores,
    label_scores,
    reduce,
    regression_chance,
    regression_scores,
)
from embedding.vector_index import build_for as build_vector_index
from reading.batching import LengthBatchSampler
from running.checkpoints import chosen_windows, data_settings, model_from_checkpoint
from running.device import device_and_checkpoint, model_input
from running.distributed import (
    gather_in_rank_order,
    gather_skips,
    own_share,
    planned_order,
    rank_and_world_size,
    rank_zero_first,
    run_script,
)
from running.settings import (
    CHECKPOINT,
    CHECKPOINT_DATA_DIR,
    RunError,
    Setting,
    at_least,
    device_setting,
    parse,
    window_settings,
)
from running.storage import write_json_atomic
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate

log = logging.getLogger("embed")
LABEL_COLUMNS = ("network", "station", "location", "family", "trace_id")  # catalogue columns --labels accepts
THUMBNAIL = 32  # projector thumbnails: THUMBNAIL x THUMBNAIL pixels of the Z spectrogram
NO_DATA_GREY = 0.83  # their rows above a recording's Nyquist frequency: figures.NO_DATA ("lightgrey")
# --labels tables: (score, header, width, format) of categorical and of numeric labels
CLASS_COLUMNS = (("knn_accuracy", "5-NN acc", 9, ".3f"), ("precision_at_k", "prec@5", 7, ".3f"),
                 ("silhouette", "silhouette", 10, ".3f"))  # fmt: skip
GROUP_COLUMNS = (("knn_accuracy", "5-NN acc", 9, ".3f"), ("balanced_accuracy", "balanced", 9, ".3f"),
                 ("ami_labels", "AMI labels", 10, ".3f"))  # fmt: skip
VALUE_COLUMNS = (("r2", "R^2", 7, ".3f"), ("mae", "MAE", 10, ".4g"))
MAP_POINTS = 20_000  # map.png draws at most this many recordings, drawn with --seed: more would only overlap
OVER_TIME_BINS = 40  # bins of start time in clusters_over_time.png
LABEL_SAMPLE = 5_000  # labelled recordings scored by --labels (leave-one-out over all rows costs N^2)


def clusters_flag(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 or 'auto', got '{text}'")
    return int(text)


SETTINGS = (
    CHECKPOINT,
    CHECKPOINT_DATA_DIR,
    Setting(
        "split",
        "all",
        "'all': every usable sample of --data_dir; 'val' / 'train': the run's",
        choices=("all", "val", "train"),
    ),
    Setting("output_dir", None, "where the outputs go (default: embeddings/<run name of the checkpoint>)"),
    Setting("batch_size", 32, "spectrograms per forward pass", int, check=at_least(1)),
    Setting("num_workers", 0, "DataLoader worker processes (0 = load in the main process)", int, check=at_least(0)),
    device_setting(),
    Setting("cache_dir", None, "spectrogram cache as in train.py (default: read the miniSEED files)"),
    *window_settings("embed"),
    Setting(
        "pooling",
        None,
        "how the latent becomes one vector (default: the checkpoint's read-out, else time-mean)",
        choices=(READOUT, *POOLINGS),
    ),
    Setting("clusters", "auto", "K of KMeans, >= 2, or 'auto' (best silhouette, size floor)", clusters_flag),
    Setting("labels", None, "catalogue column, SeisBench metadata column or CSV of path,label to score against"),
    Setting(
        "groups",
        None,
        "with --labels: columns (its CSV's or the catalogue's) whose shared values keep rows out of each other's 5-NN",
        nargs="+",
        metavar="COLUMN",
    ),
    Setting("num_anomalies", 5, "figures of the most anomalous recordings", int, check=at_least(0)),
    Setting("projector_points", 2000, "recordings in the TensorBoard projector (0 = none)", int, check=at_least(0)),
    Setting("seed", 0, "seed of clustering, samples and the map", int),
)


def parse_args(argv=None):
    return parse(__doc__, SETTINGS, argv)


def main(argv=None):
    """Embed; returns a summary dict (output_dir, rows, k, label scores) on rank 0, None on the other processes."""
    parser, args = parse_args(argv)
    return run_script(parser, args, embed)


def load(args, device):
    """(model in eval mode, checkpoint, data settings) or RunError."""
    _, checkpoint = device_and_checkpoint(str(device), args.checkpoint)
    return model_from_checkpoint(checkpoint, device).eval(), checkpoint, data_settings(checkpoint)


def open_dataset(args, settings, skips):
    """(dataset of --data_dir, as the run read its data; window_seconds, window_stride). Rank 0 indexes first."""
    window_seconds, window_stride = chosen_windows(args, settings)
    with rank_zero_first():
        dataset = SeismicSTFTDataset(
            args.data_dir or settings["data_dir"],
            settings["families"],
            settings["stft"],
            settings["extensions"],
            skips=skips,
            cache_dir=args.cache_dir,
            window_seconds=window_seconds,
            window_stride=window_stride,
        )
    return dataset, window_seconds, window_stride


def read_labels(spec, dataset, positions):
    """--labels -> (name, {position: label} or None for a catalogue column)."""
    if spec in LABEL_COLUMNS:
        return spec, None
    if dataset.traces is not None and spec in dataset.traces.dataset.metadata.columns:
        values, present = dataset.traces.labels(dataset.sample_files(positions), spec)  # floats if numeric
        found = {i: value for i, value, kept in zip(positions, values, present) if kept}
        if not found:
            raise RunError(f"--labels {spec}: no value in this column for the chosen traces of {dataset.data_dir}")
        return spec, found
    if not os.path.isfile(spec):
        raise RunError(
            f"--labels {spec}: neither a catalogue column ({', '.join(LABEL_COLUMNS)}), a metadata column of a "
            "SeisBench dataset nor a CSV file"
        )
    found = {i: row["label"] for i, row in csv_rows(spec, dataset, positions).items()}
    if not found:
        raise RunError(f"--labels {spec}: none of its paths is a usable file of {dataset.data_dir}")
    return os.path.basename(spec), found


def csv_rows(spec, dataset, positions):
    """{position: row of the CSV (a dict)} of the samples one of whose recording's files the CSV names (a recording
    of a per-channel archive is three files, E, N and Z: a row of any of them labels it; its first file first)."""
    with open(spec, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise RunError(f"--labels {spec}: needs a header line with columns path,label")
    row_of = {row["path"]: row for row in rows}
    found = {}
    for i, r in zip(positions, dataset.sample_recording[positions]):
        files = [dataset.files[r]] if dataset.traces is not None else dataset.recordings.members(r)
        named = next((f for f in files if f in row_of), None)
        if named is not None:
            found[i] = row_of[named]
    return found


def read_groups(args, dataset, positions):
    """--groups -> {column: {position: value} or None for a catalogue column}: values from the --labels CSV's
    columns (eventid, ...) or the catalogue's (network, station)."""
    if not args.groups:
        return None
    if not args.labels:
        raise RunError("--groups needs --labels")
    found, rows = {}, None
    for column in args.groups:
        if column in LABEL_COLUMNS:
            found[column] = None
            continue
        if not os.path.isfile(args.labels):
            raise RunError(
                f"--groups {column}: neither a catalogue column ({', '.join(LABEL_COLUMNS)}) nor --labels CSV"
            )
        rows = csv_rows(args.labels, dataset, positions) if rows is None else rows
        if rows and column not in next(iter(rows.values())):
            raise RunError(f"--groups {column}: not a column of {args.labels} nor of the catalogue")
        found[column] = {i: row[column] for i, row in rows.items()}
    return found


def embed(args, device):
    summary = embed_and_describe(args, device)
    if summary is None:  # not rank 0: its share is with rank 0
        return None
    # Built last, once the dataset's window index and the catalogue's columns are released: the FAISS index is held
    # in memory while it is built (its codes and ids, 40 bytes a row), the one part of embed.py that grows with N.
    build_vector_index(summary["output_dir"])  # index.faiss beside embeddings.npy, which similar.py searches
    return summary


def embed_and_describe(args, device):
    """Embeddings, catalogue, clusters, figures, projector and label scores; the summary dict of embed() on rank 0."""
    model, checkpoint, settings = load(args, device)
    if args.pooling == READOUT and model.readout is None:
        raise RunError(f"--pooling {READOUT}: {args.checkpoint} has no read-out (train.py fits one when a run ends)")
    args.pooling = args.pooling or default_pooling(model)
    skips = SkipLog()
    dataset, window_seconds, window_stride = open_dataset(args, settings, skips)
    positions = dataset.split_positions(args.split, settings["split_by"], settings["val_groups"])
    if not len(positions):
        raise RunError(
            f"no usable files of families {' '.join(settings['families'])} for --split {args.split} in "
            f"{dataset.data_dir}"
        )
    labels = read_labels(args.labels, dataset, positions) if args.labels else None
    groups = read_groups(args, dataset, positions)
    output_dir = args.output_dir or os.path.join("embeddings", checkpoint["run_name"])
    os.makedirs(output_dir, exist_ok=True)
    started, keep, chosen = time.perf_counter(), kept_positions(args, dataset, positions, labels), len(positions)
    share = own_share(planned_order(dataset.time_bins(), args.batch_size, positions))
    del positions  # 8 bytes a row, as `share`: neither is held past the loop
    passed = embed_files(model, dataset, share, args, device, output_dir, keep)
    del share
    gather_skips(skips)
    joined = join_shares(passed, os.path.join(output_dir, "embeddings.npy"))
    if joined is None:
        return None
    catalog, thumbnails, spectrograms = joined
    if not len(catalog):
        raise RunError(f"none of the {chosen} chosen files could be read (see the warnings above)")
    seconds, processes = time.perf_counter() - started, rank_and_world_size()[1]
    log.info(
        "embedded %d samples in %.1f s: %.0f samples/s, %d processes",
        len(catalog),
        seconds,
        len(catalog) / seconds,
        processes,
    )
    # embeddings.npy is complete here (float16, same row order as the catalogue); what is built from it goes below.
    embeddings = read_embeddings(os.path.join(output_dir, "embeddings.npy"))
    remove_stale_outputs(output_dir)
    reader, described = describe_outputs(
        embeddings, catalog, thumbnails, (model, dataset, device, output_dir), args, labels
    )
    description = {"window_seconds": window_seconds, "window_stride": window_stride, "processes": processes}
    summary = describe_run(embeddings, args, dataset, output_dir, description, skips)
    if labels:
        scored = (embeddings, reader, catalog.position, labels, spectrograms, args, output_dir)
        summary["labels"] = score_groups(*scored, groups) if groups else score_labels(*scored)
    build_atlas(reader, dataset, catalog.position, described, description | summary)
    print(
        f"{summary['rows']} recordings embedded ({summary['dim']} values each, pooling {args.pooling}) in {output_dir}"
    )
    print(f"skipped files: {skips.describe()}")
    return summary


def describe_outputs(embeddings, catalog, thumbnails, run, args, labels):
    """Clusters (clusters.json, the catalogue's cluster columns), map and anomaly figures, clusters over time, the
    projector and, with --labels, the clusters' label mix. run = (model, dataset, device, output_dir). Returns (the
    catalogue's reader, what the atlas draws: (clusters.json as a dict, the anomalies, the counts over time))."""
    model, dataset, device, output_dir = run
    description, span = describe_clusters(embeddings, catalog, args, output_dir)
    reader = CatalogueReader(output_dir)  # catalog.parquet, written by describe_clusters: rows read on demand
    anomalies = plot_outputs(reader, catalog, model, dataset, args, output_dir, device)
    over_time = plot_over_time(reader, description["k"], span, output_dir)
    write_projector(embeddings, reader, catalog.position, thumbnails, output_dir)
    if labels:
        add_label_mix(description, reader, catalog.position, labels, output_dir)
    return reader, (description, anomalies, over_time)


def add_label_mix(description, reader, positions, labels, output_dir):
    """--labels: each cluster's count of each label and the clusters' adjusted and normalised mutual information with
    the labels over the labelled rows, added to clusters.json (numeric labels have no mix)."""
    name, value_of = labels
    clusters, values = [], []
    for start, batch in reader.batches(["cluster"] + ([name] if value_of is None else [])):
        own = batch.column("cluster").to_numpy()
        if value_of is None:  # a catalogue column
            found = [str(v) for v in batch.column(name).to_pylist()]
        else:
            found = [value_of.get(p) for p in positions[start : start + len(own)].tolist()]
        kept = [k for k, value in enumerate(found) if value is not None]
        clusters += own[kept].tolist()
        values += [found[k] for k in kept]
    if not values or isinstance(values[0], float):
        return
    counts = [Counter() for _ in description["clusters"]]
    for c, value in zip(clusters, values):
        counts[c][value] += 1
    for summary, mix in zip(description["clusters"], counts):
        summary["labels"] = {str(v): n for v, n in sorted(mix.items(), key=lambda item: (-item[1], str(item[0])))}
    ami, nmi = adjusted_mutual_info_score(values, clusters), normalized_mutual_info_score(values, clusters)
    description["labels"] = {"name": name, "recordings": len(values), "ami": float(ami), "nmi": float(nmi)}
    write_json_atomic(os.path.join(output_dir, "clusters.json"), description)
    log.info("the %d clusters against %s (%d recordings): AMI %.3f, NMI %.3f", len(counts), name, len(values), ami, nmi)


def build_atlas(reader, dataset, positions, described, summary):
    """atlas.html and its figures (embedding/atlas.py), timed: a fixed number of recordings per cluster, read and
    drawn; no pass over the rows."""
    started, (description, anomalies, over_time) = time.perf_counter(), described
    output_dir = summary["output_dir"]
    drawn = draw_clusters(reader, dataset, positions, description["clusters"], over_time, output_dir)
    set_aside = draw_set_aside(reader, dataset, positions, description["set_aside_rows"], output_dir)
    windows = f"{summary['window_seconds']} s windows" if summary["window_seconds"] else "whole recordings"
    facts = {"rows": summary["rows"], "dim": summary["dim"], "windows": windows, "data_dir": dataset.data_dir}
    facts |= {"checkpoint": summary["checkpoint"], "pooling": summary["pooling"]}
    path = write_atlas(output_dir, facts, description, drawn, anomalies, set_aside)
    log.info("atlas written in %.1f s: %s", time.perf_counter() - started, path)


def describe_run(embeddings, args, dataset, output_dir, description, skips):
    """embedding.json: the checkpoint, data, split, pooling, windows, rows, dimension, dtype, processes and skips;
    returns the summary dict of embed()."""
    rows, dim = len(embeddings), int(embeddings.shape[1])
    description |= {"checkpoint": os.path.abspath(args.checkpoint), "data_dir": os.path.abspath(dataset.data_dir)}
    description |= {"split": args.split, "pooling": args.pooling, "rows": rows, "dim": dim}
    description |= {"dtype": str(embeddings.dtype), "skipped": skips.summary()}
    write_json_atomic(os.path.join(output_dir, "embedding.json"), description)
    return {"output_dir": output_dir, "rows": rows, "dim": dim, "checkpoint": description["checkpoint"],
            "pooling": args.pooling}  # fmt: skip


def kept_positions(args, dataset, positions, labels):
    """(projector positions, label positions, label time bins): the samples whose thumbnails or spectrograms are
    kept while embedding. Every process draws the same ones."""
    rng = np.random.default_rng(args.seed)
    projector_keep = set(rng.permutation(positions)[: args.projector_points].tolist())
    label_keep = set()
    if labels:
        labelled = positions if labels[1] is None else sorted(labels[1])
        label_keep = set(rng.permutation(labelled)[:LABEL_SAMPLE].tolist())
    label_bins = int(np.median(dataset.time_bins()[sorted(label_keep)])) if label_keep else 0
    return projector_keep, label_keep, label_bins


def join_shares(passed, path):
    """Rank 0: every process's share joined in rank order: embeddings.npy written from the parts, and (catalogue
    columns, thumbnails by position, label spectrograms by position). The other processes: None."""
    shares = gather_in_rank_order(passed)
    if shares is None:
        return None
    dim = next((share["dim"] for share in shares if share["dim"]), None)
    merge_parts(path, [share["part"] for share in shares], dim)
    thumbnails, spectrograms = {}, {}
    for share in shares:
        thumbnails |= share["thumbnails"]
        spectrograms |= share["spectrograms"]
    return Catalogue([share["catalog"] for share in shares]), thumbnails, spectrograms


def remove_stale_outputs(output_dir):
    """Outputs of an earlier run into the same directory that this run may not write again (anomaly and cluster
    figures are numbered; labels.json only comes with --labels)."""
    for name in os.listdir(output_dir):
        if (name.startswith(("anomaly_", "cluster_")) and name.endswith(".png")) or name == "labels.json":
            os.remove(os.path.join(output_dir, name))
    shutil.rmtree(os.path.join(output_dir, ATLAS_DIR), ignore_errors=True)
    if os.path.exists(os.path.join(output_dir, "atlas.html")):
        os.remove(os.path.join(output_dir, "atlas.html"))


@torch.no_grad()
def embed_files(model, dataset, share, args, device, output_dir, keep):
    """One pass over this process's share in batches of one length: its part of embeddings.npy streamed to disk,
    its catalogue columns, and the projector thumbnails and label spectrograms (by position) of the samples in
    `keep` = (projector positions, label positions, label time bins)."""
    projector_keep, label_keep, label_bins = keep
    # Kept arrays live in one buffer each: thousands of small arrays among the batches' large transient ones keep
    # the heap from shrinking (measured: 14 KB more resident memory per window embedded, 14 GB at 10^6 windows).
    thumbnail_slot, label_slot = slots(projector_keep, share), slots(label_keep, share)
    thumbnails = np.zeros((len(thumbnail_slot), THUMBNAIL, THUMBNAIL), dtype=np.float32)
    spectrograms = np.zeros((len(label_slot), 3, dataset.stft.n_freq, label_bins), dtype=np.float32)
    sampler = LengthBatchSampler(dataset.time_bins(), args.batch_size, share)
    workers = dict(num_workers=args.num_workers, persistent_workers=False) if args.num_workers else {}
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate, **workers)
    writer = EmbeddingWriter(os.path.join(output_dir, "embeddings.npy"), rank_and_world_size()[0])
    catalog = CatalogPart(output_dir, rank_and_world_size()[0])
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
            rate = dataset.recordings.rate[dataset.sample_recording[position]]  # its own, before resampling
            catalog.append(catalog_row(meta, relpath, duration, mse[k], mse_time_mean[k], rate), position)
            valid = x[k, :, :, : int(mask[k].sum())].float().cpu()
            if position in thumbnail_slot:
                thumbnails[thumbnail_slot[position]] = thumbnail(valid, dataset.stft.bins_below_nyquist(rate))
            if position in label_slot:
                spectrograms[label_slot[position]] = F.interpolate(valid[None], size=(valid.shape[1], label_bins))[0]
    writer.close(merge=False)
    return {
        "catalog": catalog.close(),  # the part's path, and the position and anomaly ratio of each row
        "thumbnails": dict(zip(thumbnail_slot, thumbnails)),  # by position; numpy views pickle as their own rows
        "spectrograms": dict(zip(label_slot, spectrograms)),
        "dim": writer.dim,
        "part": writer.part,
    }


def slots(kept, share):
    """{position: slot} of the positions of `kept` (a set) in `share` (an array), in ascending order."""
    found = np.intersect1d(np.fromiter(kept, dtype=np.int64, count=len(kept)), share)
    return {p: i for i, p in enumerate(found.tolist())}


def thumbnail(spectrogram, n_valid):
    """(3, F, T) -> (THUMBNAIL, THUMBNAIL) grey image of the Z component, low frequencies at the bottom; the rows
    wholly at and above the recording's Nyquist frequency (bins n_valid and up) flat NO_DATA_GREY, as no data."""
    image = F.interpolate(spectrogram[None, 2:3], size=(THUMBNAIL, THUMBNAIL), mode="area")[0, 0]
    image[-(-n_valid * THUMBNAIL // spectrogram.shape[1]) :] = NO_DATA_GREY
    return image.flip(-2).numpy()


def describe_clusters(embeddings, catalog, args, output_dir):
    """Cluster, map and anomaly columns of every row, written with the rest of the catalogue (catalog.parquet and
    catalog.csv); clusters.json. Fitted on a sample (representation.FIT_SAMPLE rows), assigned to every row in chunks
    of the memory map and written as they are computed. Returns (clusters.json as a dict, the first and last start
    time of all rows as datetime64[s], from the clusters' own)."""
    n_rows = len(embeddings)
    if args.clusters != "auto" and args.clusters > n_rows:
        raise RunError(f"--clusters {args.clusters}: more clusters than the {n_rows} recordings embedded")
    if n_rows < 3:
        raise RunError(f"{n_rows} recordings embedded: clustering needs at least 3")
    pipeline, reduced = reduce(embeddings, args.seed)
    kmeans, description = cluster(reduced, args.clusters, args.seed)
    description["set_aside_rows"] = fit_sample(n_rows, args.seed)[description["set_aside_rows"]].tolist()  # rows
    write_catalog(output_dir, catalog.tables(), cluster_columns(pipeline, kmeans, embeddings, catalog.ratio))
    catalog.remove()
    reader = CatalogueReader(output_dir)
    scanned = scan_clusters(reader, description["k"])
    description["clusters"] = [cluster_summary(reader, c, scanned[c]) for c in range(description["k"])]
    write_json_atomic(os.path.join(output_dir, "clusters.json"), description)
    log.info("%s: K = %d (%s)", description["method"], description["k"], description["k_chosen_by"])
    firsts = [summary["first"] for summary in description["clusters"] if summary["first"] is not None]
    lasts = [summary["last"] for summary in description["clusters"] if summary["last"] is not None]
    return description, start_times(np.array([min(firsts), max(lasts)], dtype=object))


def cluster_columns(pipeline, kmeans, embeddings, ratios):
    """The columns computed for every row (cluster, its distance, anomaly rank, map position), ASSIGN_CHUNK rows at a
    time in row order (write_catalog's `added`): read from the memory map, never a column of N in memory."""
    ranks = anomaly_ranks(ratios, ASSIGN_CHUNK)
    for (_, rows), rank in zip(read_in_chunks(embeddings, ASSIGN_CHUNK), ranks):
        labels, distances, map_xy = assign_rows(pipeline, kmeans, rows)
        yield {"cluster": labels, "cluster_distance": distances, "anomaly_rank": rank, "map_x": map_xy[:, 0],
               "map_y": map_xy[:, 1]}  # fmt: skip


def anomaly_ranks(ratios, chunk):
    """The anomaly rank of every row, `chunk` rows at a time: 1 = the highest ratio, ties in row order (a stable sort
    of -ratios). Counted in a sorted copy of the ratios (4 bytes a row), not an argsort of N (8)."""
    ascending, tied_before = np.sort(ratios), Counter()
    for start in range(0, len(ratios), chunk):
        own = ratios[start : start + chunk]
        above = np.searchsorted(ascending, own, side="right")
        ranks = (len(ratios) - above + 1).astype(np.int64)
        for i in np.flatnonzero(above - np.searchsorted(ascending, own, side="left") > 1).tolist():
            ranks[i] += tied_before[own[i]]  # equal ratios of earlier rows rank first
            tied_before[own[i]] += 1
        yield ranks


COUNTED = ("family", "station", "network", "sampling_rate")  # clusters.json counts each cluster's members by these


def scan_clusters(reader, k):
    """One pass over the catalogue's cluster columns, COUNTED and starttime, a row group at a time: for each cluster
    its size, the count of each value, its first and last start time (ISO text), its NEAREST_SHOWN rows nearest the
    centre and its EDGE_SHOWN farthest from it (ties in row order)."""
    none = (np.zeros(0), np.zeros(0, dtype=np.int64))
    scanned = [{"size": 0, "counts": {column: Counter() for column in COUNTED}, "first": None, "last": None,
                "nearest": none, "edge": none} for _ in range(k)]  # fmt: skip
    for start, batch in reader.batches([*COUNTED, "starttime", "cluster", "cluster_distance"]):
        own, distances = batch.column("cluster").to_numpy(), batch.column("cluster_distance").to_numpy()
        starts = np.array(batch.column("starttime").to_pylist(), dtype=object)
        count_values(scanned, own, batch)
        for c in np.unique(own).tolist():
            members, found = np.flatnonzero(own == c), scanned[c]
            found["size"] += len(members)
            first, last = starts[members].min(), starts[members].max()
            found["first"] = first if found["first"] is None else min(first, found["first"])
            found["last"] = last if found["last"] is None else max(last, found["last"])
            found["nearest"] = smallest(found["nearest"], distances[members], members + start, NEAREST_SHOWN)
            found["edge"] = smallest(found["edge"], -distances[members], members + start, EDGE_SHOWN)
    return scanned


def smallest(held, distances, rows, n):
    """The n (distance, row) pairs of smallest distance among those held and the new ones; ties in row order."""
    kept_distances, kept_rows = np.concatenate([held[0], distances]), np.concatenate([held[1], rows])
    order = np.lexsort((kept_rows, kept_distances))[:n]
    return kept_distances[order], kept_rows[order]


def count_values(scanned, own, batch):
    """Adds a row group's members of each cluster (`own`: their clusters) to its counts of each value of COUNTED."""
    for column in COUNTED:
        encoded = pc.dictionary_encode(batch.column(column))
        values, n_values = encoded.dictionary.to_pylist(), len(encoded.dictionary)
        pairs, counts = np.unique(own * n_values + encoded.indices.to_numpy(), return_counts=True)
        for pair, count in zip(pairs.tolist(), counts.tolist()):
            scanned[pair // n_values]["counts"][column][values[pair % n_values]] += count


def cluster_summary(reader, c, scanned):
    nearest = scanned["nearest"][1]
    paths = reader.rows(nearest, ["path"])

    def counts(column):  # most members first; ties in the order of the values
        ordered = sorted(scanned["counts"][column].items(), key=lambda item: (-item[1], item[0]))
        return {(f"{value:g}" if isinstance(value, float) else str(value)): int(n) for value, n in ordered}

    return {
        "cluster": c,
        "size": scanned["size"],
        "families": counts("family"),
        "stations": counts("station"),
        "networks": counts("network"),
        "sampling_rates": counts("sampling_rate"),
        "first": scanned["first"],
        "last": scanned["last"],
        "nearest_rows": nearest.tolist(),
        "nearest": [paths[i]["path"] for i in nearest.tolist()],
        "edge_rows": scanned["edge"][1].tolist(),
    }


@torch.no_grad()
def plot_outputs(reader, catalog, model, dataset, args, output_dir, device):
    """map.png; anomaly_<rank>_<file>.png of the most anomalous recordings; returns those recordings (dicts of their
    catalogue columns, row, blur baseline's MSE and figure) in rank order."""
    shown = fit_sample(len(catalog), args.seed, MAP_POINTS)
    found = reader.rows(shown, ["map_x", "map_y", "cluster", "family"])
    rows = [found[i] for i in shown.tolist()]
    xy = np.array([[row["map_x"], row["map_y"]] for row in rows]).reshape(-1, 2)
    colourings = {
        "coloured by cluster": np.array([row["cluster"] for row in rows]),
        "coloured by channel family": np.array([row["family"] for row in rows], dtype=str),
    }
    save_figure(plot_map(xy, colourings, len(catalog)), os.path.join(output_dir, "map.png"))
    top = ranked_first(reader, args.num_anomalies)
    columns = ["path", "trace_id", "starttime", "anomaly_rank", "mse", "mse_time_mean", "cluster", "sampling_rate"]
    found, anomalies = reader.rows(top, columns), []
    for i in top.tolist():
        row = found[i]
        x = dataset[catalog.position[i]][0].float()[None].to(device)
        reconstruction = model(x)[0].cpu().numpy()
        file_id = sample_name(row["path"], row["starttime"] if dataset.window_seconds else None)
        rank, ratio = row["anomaly_rank"], row["mse"] / row["mse_time_mean"]
        title = f"anomaly {rank}: {file_id}, MSE {ratio:.2f} x the time-mean baseline's"
        figure = plot_reconstruction(x[0].cpu().numpy(), reconstruction, dataset.stft, title, row["sampling_rate"])
        name = f"anomaly_{rank}_{file_id}.png"
        save_figure(figure, os.path.join(output_dir, name))
        mse_blur = float(((blur(x, torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool)) - x) ** 2).mean())
        anomalies.append({**row, "rank": rank, "row": i, "mse_blur": mse_blur, "figure": name})
    return anomalies


def ranked_first(reader, n):
    """Rows of anomaly_rank 1..n, in rank order (the anomaly_rank column read a row group at a time)."""
    found = []
    for start, batch in reader.batches(["anomaly_rank"]):
        ranks = batch.column("anomaly_rank").to_numpy()
        rows = np.flatnonzero(ranks <= n)
        found += zip(ranks[rows].tolist(), (rows + start).tolist())
    return np.array([row for _, row in sorted(found)], dtype=np.int64)


def plot_over_time(reader, k, span, output_dir):
    """The members of each cluster in OVER_TIME_BINS equal bins of start time, counted a row group at a time:
    (bin edges in s since 1970, (K, bins) counts), None where every row starts at one time. Drawn stacked in
    clusters_over_time.png where the rows span more than a day (an earlier run's is removed where not)."""
    over_time = os.path.join(output_dir, "clusters_over_time.png")
    if os.path.exists(over_time):
        os.remove(over_time)
    if span[1] == span[0]:
        return None
    edges = np.linspace(span[0].astype("int64"), span[1].astype("int64"), OVER_TIME_BINS + 1)
    counts = np.zeros((k, OVER_TIME_BINS), dtype=np.int64)
    for _, batch in reader.batches(["starttime", "cluster"]):
        times = start_times(np.array(batch.column("starttime").to_pylist(), dtype=object)).astype("int64")
        own = batch.column("cluster").to_numpy()
        for c in np.unique(own).tolist():
            counts[c] += np.histogram(times[own == c], edges)[0]
    if span[1] - span[0] > np.timedelta64(1, "D"):
        save_figure(plot_clusters_over_time(edges, counts), over_time)
    return edges, counts


def rows_of(positions, wanted):
    """Catalogue rows (ascending) whose dataset positions (`positions`, one per row) are in `wanted`."""
    return np.flatnonzero(np.isin(positions, list(wanted))).tolist()


def write_projector(embeddings, reader, positions, thumbnails, output_dir):
    """projector/: TensorBoard's embedding projector of the rows with thumbnails (built aside, then swapped in)."""
    final, building = os.path.join(output_dir, "projector"), os.path.join(output_dir, ".projector.tmp")
    shutil.rmtree(building, ignore_errors=True)
    if thumbnails:
        chosen = rows_of(positions, thumbnails)
        found = reader.rows(chosen)
        metadata = [[str(found[i][c]) for c in CATALOG_COLUMNS] for i in chosen]
        with SummaryWriter(building) as writer:
            writer.add_embedding(
                torch.from_numpy(read_rows(embeddings, chosen)),
                metadata=metadata,
                metadata_header=list(CATALOG_COLUMNS),
                label_img=torch.from_numpy(np.stack([thumbnails[positions[i]] for i in chosen]))[:, None]
                .expand(-1, 3, -1, -1)  # grey: the Z thumbnail in each of the three colour channels
                .contiguous(),
                tag="embeddings",
            )
    shutil.rmtree(final, ignore_errors=True)
    if thumbnails:
        os.replace(building, final)


def score_labels(embeddings, reader, all_positions, labels, spectrograms, args, output_dir):
    """Leave-one-out k-NN accuracy, precision@k and silhouette of the labels for the embedding and two baselines of
    the same dimension; printed, and written to labels.json."""
    name = labels[0]
    chosen, values, candidates = labelled_features(embeddings, reader, all_positions, labels, spectrograms, args)
    if isinstance(values[0], float):  # a numeric metadata column (source_magnitude, source_distance_km, ...)
        return score_values(name, values, candidates, output_dir)
    table = {who: {"dim": int(f.shape[1]), **label_scores(f, values, args.seed)} for who, f in candidates.items()}
    counts = dict(zip(*np.unique(values, return_counts=True)))
    result = {"labels": name, "recordings": len(chosen), "counts": {str(k): int(v) for k, v in counts.items()}}
    result["scores"], result["chance"] = table, chance_scores(values)
    write_json_atomic(os.path.join(output_dir, "labels.json"), result)
    title = f"labels {name}: {len(chosen)} recordings, {len(counts)} labels; leave-one-out 5-NN, standardised features"
    print_scores(title, CLASS_COLUMNS, table, ("chance (the labels alone)", result["chance"]))
    return result


def column_values(reader, chosen, positions, column, value_of):
    """The values of one labels or group column for catalogue rows `chosen` (dataset positions `positions`): from the
    catalogue where value_of is None, else value_of[position]."""
    if value_of is None:
        found = reader.rows(chosen, [column])
        return [str(found[i][column]) for i in chosen]
    return [value_of[p] for p in positions]


def labelled_features(embeddings, reader, all_positions, labels, spectrograms, args):
    """(catalogue rows scored, their labels, {representation: features}) of the embedding and the baselines."""
    chosen = rows_of(all_positions, spectrograms)
    positions = all_positions[chosen]
    values = column_values(reader, chosen, positions, *labels)
    if len(set(values)) < 2:
        raise RunError(f"--labels {args.labels}: the embedded recordings hold fewer than 2 different labels")
    spectra = np.stack([spectrograms[p] for p in positions])
    compared = compared_features(read_rows(embeddings, chosen), spectra, args.seed)
    return chosen, values, {f"model ({args.pooling})": compared.pop("model"), **compared}


def score_groups(embeddings, reader, all_positions, labels, spectrograms, args, output_dir, groups):
    """--groups: 5-NN accuracy and balanced accuracy with every neighbour sharing a group value with the query left
    out, and the k-means AMI with the labels and each group column, for the embedding and the baselines; the prior
    rule as chance. Printed, and written to labels.json. Rows without a value of every group column are left out."""
    chosen = rows_of(all_positions, spectrograms)
    positions = all_positions[chosen]
    known = [p for p in positions if all(g is None or p in g for g in groups.values())]
    if len(known) < len(positions):
        log.warning(
            "--groups: %d labelled recordings have no value of a group column: not scored", len(positions) - len(known)
        )
    kept = {p: spectrograms[p] for p in known}
    chosen, values, candidates = labelled_features(embeddings, reader, all_positions, labels, kept, args)
    positions = all_positions[chosen]
    by_group = {c: np.array(column_values(reader, chosen, positions, c, g)) for c, g in groups.items()}
    table = {who: {"dim": int(f.shape[1]), **grouped_label_scores(f, values, by_group, args.seed)}
             for who, f in candidates.items()}  # fmt: skip
    counts = dict(zip(*np.unique(values, return_counts=True)))
    result = {"labels": labels[0], "groups": list(groups), "recordings": len(chosen)}
    result["counts"] = {str(k): int(v) for k, v in counts.items()}
    result["groups_held"] = {c: int(len(np.unique(v))) for c, v in by_group.items()}
    result["scores"], result["chance"] = table, grouped_chance(values, groups)
    write_json_atomic(os.path.join(output_dir, "labels.json"), result)
    title = (
        f"labels {labels[0]}: {len(chosen)} recordings, {len(counts)} labels; 5-NN with neighbours sharing "
        f"{' or '.join(groups)} left out; k-means K = {len(counts)}; standardised features"
    )
    columns = (*GROUP_COLUMNS, *((f"ami_{c}", f"AMI {c}", max(9, len(c) + 4), ".3f") for c in groups))
    print_scores(title, columns, table, ("chance (the commonest label)", result["chance"]))
    return result


def score_values(name, values, candidates, output_dir):
    """Leave-one-out k-NN regression (R^2, mean absolute error) of numeric labels for the embedding and the baselines;
    printed, and written to labels.json."""
    table = {who: {"dim": int(f.shape[1]), **regression_scores(f, values)} for who, f in candidates.items()}
    result = {"labels": name, "recordings": len(values), "numeric": True, "scores": table}
    result["chance"] = regression_chance(values)
    write_json_atomic(os.path.join(output_dir, "labels.json"), result)
    title = f"labels {name}: {len(values)} recordings, numeric; leave-one-out 5-NN regression, standardised features"
    print_scores(title, VALUE_COLUMNS, table, ("chance (the mean of the others)", result["chance"]))
    return result


def print_scores(title, columns, table, chance):
    """The score table of --labels: one row per representation, then chance = (name, scores) where it has them."""
    print(title)
    print(f"{'representation':34} {'dim':>5} " + " ".join(f"{head:>{width}}" for _, head, width, _ in columns))
    for who, scores in table.items():
        cells = " ".join(f"{scores[key]:{width}{form}}" for key, _, width, form in columns)
        print(f"{who:34} {scores['dim']:5d} {cells}")
    name, values = chance
    cells = " ".join(f"{values[key]:{width}{form}}" for key, _, width, form in columns if key in values)
    print(f"{name:34} {'':5} {cells}")


if __name__ == "__main__":
    main()
