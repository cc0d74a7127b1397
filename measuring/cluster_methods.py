"""Which clustering `embed.py --clusters auto` should use, measured: on each embed output folder (embeddings.npy,
catalog.parquet, embedding.json) the embeddings are reduced as embed.py reduces them (representation.reduce), then
  - k-means with the size floor: embed.py's own choice (representation.cluster, "auto");
  - GaussianMixture, K in 2..12 by lowest BIC, full and diagonal covariances;
  - HDBSCAN with min_cluster_size = the size floor (min_samples its default, the same, and 1); its noise rows (-1)
    are counted apart, as anomalies;
  - plain k-means, K in 2..12 by best silhouette (the rule before the size floor).
Each gets its K, smallest and largest cluster, rows outside a cluster, the silhouette (sampled as embed.py samples
it; HDBSCAN's on its clustered rows), AMI with the catalogue's network and family (and a --labels CSV) and seconds.

    python -m measuring.cluster_methods /tmp/meth/exotic --labels /work/shared/data/exotic_events/labels.csv \
        --labels_root /work/shared/data/exotic_events --results_dir results
"""

import argparse
import csv
import json
import os
import re
import time

import numpy as np
import pyarrow.parquet as pq
from sklearn.cluster import HDBSCAN
from sklearn.metrics import adjusted_mutual_info_score
from sklearn.mixture import GaussianMixture

from embedding.catalogue import read_embeddings
from embedding.representation import AUTO_K, cluster, fit_kmeans, fit_sample, reduce, silhouette, size_floor
from measuring.results import dated_path, markdown_table, write_results

HEADER = ["method", "K", "smallest", "largest", "noise / set aside", "under the floor", "silhouette", "AMI network",
          "AMI family", "AMI sampling rate", "AMI labels", "seconds"]  # fmt: skip
CHANNEL = re.compile(r"^([^./]+\.[^./]+\.[^./]*\.[A-Z0-9]{2})[A-Z0-9](__.*)$")  # NET.STA.LOC.CHA__start__end.mseed


def recording_key(path):
    """A per-channel file's path with its component letter as '?': the E, N and Z files of one recording share it,
    so a CSV row of any of them labels the recording (as embed.py's csv_rows does through the recording's members).
    Other names (event files of three components) are their own key."""
    folder, name = os.path.split(os.path.normpath(path))
    found = CHANNEL.match(name)
    return os.path.join(folder, f"{found[1]}?{found[2]}" if found else name)


def csv_labels(spec, column, root, data_dir, paths):
    """(N,) labels of the catalogue's paths (relative to data_dir) from a CSV of path,<column>, its paths relative
    to root; None where no row names any of the recording's files."""
    with open(spec, newline="") as f:
        label_of = {recording_key(os.path.join(root, row["path"])): row[column] for row in csv.DictReader(f)}
    return np.array([label_of.get(recording_key(os.path.join(data_dir, p))) for p in paths], dtype=object)


def kmeans_floor(reduced, seed):
    kmeans, description = cluster(reduced, "auto", seed)
    return kmeans.predict(reduced), description["set_aside"], "trimmed k-means, " + description["k_chosen_by"]


def gaussian_mixture(reduced, seed, covariance):
    """Lowest BIC over AUTO_K; a K whose fit fails (a component of collapsed rows: ill-defined covariance) is left
    out and named."""
    reduced, fits, failed = reduced.astype(np.float64), {}, []
    for k in AUTO_K:
        try:
            fits[k] = GaussianMixture(k, covariance_type=covariance, random_state=seed).fit(reduced)
        except ValueError:  # sklearn: "some components have ill-defined empirical covariance"
            failed.append(k)
    chosen = f"lowest BIC over K in 2..12, covariance '{covariance}'"
    chosen += f"; K {', '.join(map(str, failed))} failed (ill-defined covariance)" if failed else ""
    if not fits:
        return np.full(len(reduced), -1), len(reduced), chosen
    best = min(fits.values(), key=lambda fit: fit.bic(reduced))
    return best.predict(reduced), 0, chosen


def hdbscan(reduced, seed, min_samples=None):
    """HDBSCAN, min_cluster_size the size floor; min_samples (density of a core row) its default, that size too."""
    floor = size_floor(len(reduced))
    labels = HDBSCAN(min_cluster_size=floor, min_samples=min_samples, copy=True).fit_predict(reduced)
    return labels, int((labels < 0).sum()), f"HDBSCAN, min_cluster_size {floor}, min_samples {min_samples or floor}"


def kmeans_silhouette(reduced, seed):
    labels = {k: fit_kmeans(reduced, k, seed).labels_ for k in AUTO_K if k < len(reduced)}
    best = max(labels, key=lambda k: (np.nan_to_num(silhouette(reduced, labels[k], seed), nan=-1), -k))
    return labels[best], 0, "k-means, highest silhouette over K in 2..12 (no floor)"


METHODS = {
    "k-means, size floor (now)": kmeans_floor,
    "GaussianMixture full, BIC": lambda reduced, seed: gaussian_mixture(reduced, seed, "full"),
    "GaussianMixture diag, BIC": lambda reduced, seed: gaussian_mixture(reduced, seed, "diag"),
    "HDBSCAN, noise apart": hdbscan,
    "HDBSCAN min_samples 1": lambda reduced, seed: hdbscan(reduced, seed, min_samples=1),
    "k-means, silhouette (old)": kmeans_silhouette,
}


def ami(truth, labels):
    """AMI over the rows that have a truth value (noise rows, -1, count as one group of their own); '-' if none."""
    known = np.array([value is not None for value in truth])
    if not known.any():
        return "-"
    return f"{adjusted_mutual_info_score(truth[known].astype(str), labels[known]):.3f}"


def measure(reduced, seed, truths, method):
    """One row of the table: the method run on the reduced sample, its clusters described."""
    started = time.perf_counter()
    labels, outside, chosen = METHODS[method](reduced, seed)
    seconds = time.perf_counter() - started
    clustered = labels >= 0
    sizes = np.bincount(labels[clustered], minlength=1)
    sizes = sizes[sizes > 0]
    extremes = (sizes.min(), sizes.max()) if len(sizes) else ("-", "-")  # every row noise: no cluster
    under = int(sizes[sizes < size_floor(len(reduced))].sum())
    score = silhouette(reduced[clustered], labels[clustered], seed)
    amis = [ami(truth, labels) for truth in truths]
    cells = [method, len(sizes), *extremes, outside, under, f"{score:.3f}", *amis, f"{seconds:.2f}"]
    return cells, chosen


def truths_of(folder, embedded, rows, args):
    """([network, family, sampling rate, the --labels CSV's labels] of the rows (object arrays; None where there is no
    value), what was matched)."""
    path = os.path.join(folder, "catalog.parquet")
    wanted = ["path", "network", "family", "sampling_rate"]
    catalog = pq.read_table(path, columns=[c for c in wanted if c in pq.read_schema(path).names])
    columns = {name: catalog.column(name).to_numpy(zero_copy_only=False)[rows] for name in catalog.column_names}
    truths = [columns["network"].astype(object), columns["family"].astype(object)]
    # the recording's own sampling rate (catalogues of embed.py from 7 December 2026 on): clusters of instruments
    truths.append(columns["sampling_rate"].astype(object) if "sampling_rate" in columns else np.full(len(rows), None))
    if not args.labels:
        return truths + [np.full(len(rows), None)], "no --labels"
    root = args.labels_root or embedded["data_dir"]
    truths.append(csv_labels(args.labels, args.label_column, root, embedded["data_dir"], columns["path"]))
    return truths, f"{sum(v is not None for v in truths[-1])} of {len(rows)} rows labelled by {args.labels}"


def folder_table(folder, args):
    """(Markdown section, table text) of one embed output folder."""
    embeddings = read_embeddings(os.path.join(folder, "embeddings.npy"))
    with open(os.path.join(folder, "embedding.json")) as f:
        embedded = json.load(f)
    rows = fit_sample(len(embeddings), args.seed)  # the rows reduce() fits on, in its order
    truths, matched = truths_of(folder, embedded, rows, args)
    _, reduced = reduce(embeddings, args.seed)
    measured = [measure(reduced, args.seed, truths, method) for method in METHODS]
    table = markdown_table(HEADER, [cells for cells, _ in measured])
    notes = "".join(f"- {cells[0]}: {chosen}\n" for cells, chosen in measured)
    windows = f"{embedded['window_seconds']} s windows" if embedded["window_seconds"] else "whole recordings"
    head = (
        f"## {folder}\n\n{len(embeddings)} rows ({len(rows)} clustered), {reduced.shape[1]} principal components; "
        f"checkpoint {embedded['checkpoint']}, split {embedded['split']}, {windows}; size floor "
        f"{size_floor(len(reduced))} rows; {matched}.\n\n"
    )
    return head + table + "\n" + notes + "\n", table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", metavar="EMBED_DIR", help="embed.py output folders")
    parser.add_argument("--labels", default=None, help="CSV of path,<label column> (default: none)")
    parser.add_argument("--label_column", default="label", help="the CSV's label column (default: label)")
    parser.add_argument("--labels_root", default=None, help="folder the CSV's paths are relative to (default: "
                        "the data_dir of embedding.json, as embed.py --labels)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample, PCA and fits (default: 0, embed.py's)")
    parser.add_argument("--results_dir", default="results", help="where the dated results file goes (default: results)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sections = []
    for folder in args.folders:
        section, table = folder_table(folder, args)
        print(f"{folder}\n{table}")
        sections.append(section)
    columns = ("Columns: K = non-empty clusters (HDBSCAN's noise is not one); smallest / largest = rows of a cluster; "
               "noise / set aside = HDBSCAN's noise rows, or the rows trimmed k-means set aside while fitting (then "
               "assigned to the nearest cluster); under the floor = rows in clusters smaller than the size floor; "
               "silhouette on the clustered rows; AMI over every row, noise as a group of its own.\n\n")  # fmt: skip
    path = dated_path(args.results_dir, "cluster-methods")
    return write_results(path, "Clustering methods for --clusters auto", columns + "".join(sections))


if __name__ == "__main__":
    main()
