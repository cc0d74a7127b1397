"""What embeddings are good for, with scikit-learn: clusters, a 2-D map, nearest neighbours, and how well they
separate labels compared with baselines computed from the spectrograms themselves.

Every method works in one space: the embeddings standardised (zero mean, unit variance per dimension), so that no
dimension dominates by its scale. Clustering reduces that space with PCA first; the map is its first two principal
components (a linear map: fitted on a sample, it places 132k points in seconds, where t-SNE would take hours on a CPU).
Scaler, PCA and KMeans are fitted on a sample of FIT_SAMPLE rows; embed.py then assigns every row (assign_rows) in
chunks of ASSIGN_CHUNK rows read from the memory-mapped embeddings, written to the catalogue as they are computed: no
N x D matrix, nor any column of N, is held in memory.
"""

import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_mutual_info_score, balanced_accuracy_score, silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from embedding.catalogue import read_rows

CLUSTER_COMPONENTS = 32  # principal components the clustering works in
AUTO_K = range(2, 13)  # K tried by --clusters auto
FIT_SAMPLE = 20_000  # rows that the scaler, PCA and KMeans are fitted on (all rows are assigned)
SILHOUETTE_SAMPLE = 5_000  # rows the silhouette is computed on
NEIGHBOURS = 5  # k of the k-nearest-neighbour scores
ASSIGN_CHUNK = 4_096  # rows read from the embeddings at a time to assign clusters and map positions (~38 MB float32)


def fit_sample(n_rows, seed, size=None):
    """Sorted row numbers of a random sample of at most `size` (default FIT_SAMPLE) rows."""
    size = size or FIT_SAMPLE
    if n_rows <= size:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size, replace=False))


def reduce(embeddings, seed):
    """Standardise -> PCA fitted on a sample of the rows: (pipeline, the sample reduced (S, components)).

    `embeddings` may be a memory map of any float dtype: only the sample is read, as float32."""
    rows = read_rows(embeddings, fit_sample(len(embeddings), seed))
    components = min(CLUSTER_COMPONENTS, embeddings.shape[1], len(rows))
    pipeline = make_pipeline(StandardScaler(), PCA(components, random_state=seed)).fit(rows)
    return pipeline, pipeline.transform(rows)


def silhouette(features, labels, seed):
    """Silhouette of labels on at most SILHOUETTE_SAMPLE rows; nan when there are fewer than 2 labels."""
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return float("nan")
    size = min(SILHOUETTE_SAMPLE, len(labels))
    return float(silhouette_score(features, labels, sample_size=size, random_state=seed))


MIN_CLUSTER_SHARE, MIN_CLUSTER_SIZE = 0.02, 5  # --clusters auto: no cluster below 2 % of the rows or 5 rows


SET_ASIDE_LISTED = 100  # rows set aside by --clusters auto listed in clusters.json


def size_floor(n_rows):
    """The smallest cluster --clusters auto accepts: 2 % of the rows or 5, whichever is larger."""
    return max(MIN_CLUSTER_SIZE, int(np.ceil(MIN_CLUSTER_SHARE * n_rows)))


def cluster(reduced, k, seed):
    """KMeans fitted on the reduced sample (reduce), K given or ("auto") the best silhouette over AUTO_K, each K
    fitted with its outliers set aside (trimmed_kmeans): no cluster below size_floor rows, so one outlier never wins
    the silhouette as a cluster of its own; outliers are assigned to the nearest kept cluster, and the first
    SET_ASIDE_LISTED of them listed (`set_aside_rows`: positions in `reduced`), for the atlas to show apart.

    Returns (fitted KMeans, description: method, K, how chosen, scores, the silhouette on the sample).
    """
    floor = size_floor(len(reduced))
    if k == "auto":
        fits = {n: trimmed_kmeans(reduced, n, seed, floor) for n in AUTO_K if n * floor <= len(reduced)}
        fits = {n: (fit, kept) for n, (fit, kept) in fits.items() if meets_floor(fit, reduced, n, floor)}
        chosen = f"highest silhouette over the K in 2..12 whose clusters all hold {floor} rows or more"
        if not fits:  # too few rows, or too scattered, for two clusters of the floor: two clusters, no floor
            fits = {2: (fit_kmeans(reduced, 2, seed), np.ones(len(reduced), dtype=bool))}
            chosen = f"K = 2: no K in {AUTO_K.start}..{AUTO_K.stop - 1} keeps every cluster at {floor} rows or more"
        scores = {n: silhouette(reduced[kept], fit.labels_, seed) for n, (fit, kept) in fits.items()}
        k = max(scores, key=lambda n: (np.nan_to_num(scores[n], nan=-1), -n))
        kmeans, kept = fits[k]
    else:
        scores, chosen = {}, "given (--clusters)"
        kmeans, kept = fit_kmeans(reduced, k, seed), np.ones(len(reduced), dtype=bool)
    method = f"KMeans (k-means++, 10 starts) on {reduced.shape[1]} principal components of the standardised embeddings"
    description = {"method": method, "k": int(k), "k_chosen_by": chosen, "silhouette_by_k": scores}
    description |= {"fitted_on": int(kept.sum()), "set_aside": int((~kept).sum()), "size_floor": floor}
    description["set_aside_rows"] = np.flatnonzero(~kept)[:SET_ASIDE_LISTED].tolist()
    description["silhouette"] = silhouette(reduced, kmeans.predict(reduced), seed)
    return kmeans, description


def meets_floor(kmeans, reduced, k, floor):
    """Whether every one of the k clusters holds at least `floor` rows once every row is assigned."""
    return np.bincount(kmeans.predict(reduced), minlength=k).min() >= floor


def trimmed_kmeans(reduced, k, seed, floor, rounds=3):
    """(KMeans of k clusters, mask of the rows it was fitted on): the members of clusters below `floor` rows are set
    aside and the rest refitted, up to `rounds` times."""
    kept = np.ones(len(reduced), dtype=bool)
    kmeans = fit_kmeans(reduced, k, seed)
    for _ in range(rounds):
        small = np.isin(kmeans.labels_, np.flatnonzero(np.bincount(kmeans.labels_, minlength=k) < floor))
        if not small.any() or kept.sum() - small.sum() < k * floor:
            break
        kept[np.flatnonzero(kept)[small]] = False
        kmeans = fit_kmeans(reduced[kept], k, seed)  # labels_ stay those of the rows it was fitted on
    return kmeans, kept


def assign_rows(pipeline, kmeans, rows):
    """The cluster, distance to its centre and map position (the first two principal components) of a block of
    float32 rows: (labels (n,), distances (n,), map (n, 2)). embed.py streams every row through it in chunks."""
    reduced = pipeline.transform(rows)
    labels = kmeans.predict(reduced).astype(np.int64)
    distances = np.linalg.norm(reduced - kmeans.cluster_centers_[labels], axis=1).astype(np.float64)
    map_xy = np.zeros((len(rows), 2))
    map_xy[:, : min(2, reduced.shape[1])] = reduced[:, :2]
    return labels, distances, map_xy


def fit_kmeans(features, k, seed):
    return KMeans(k, n_init=10, random_state=seed).fit(features)


def standardised(features):
    return StandardScaler().fit_transform(features)


def leave_one_out_neighbours(features, k=NEIGHBOURS):
    """(N, k) rows of each row's k nearest other rows, Euclidean."""
    _, rows = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    # Each row is its own nearest neighbour, unless an exact duplicate came first: drop the row itself, not column 0.
    return np.array([[r for r in found if r != i][:k] for i, found in enumerate(rows)])


def majority(labels):
    """The most frequent of labels ordered nearest first; a tie goes to the label of the nearer neighbour."""
    values = list(labels)
    return max(values, key=lambda label: (values.count(label), -values.index(label)))


def label_scores(features, labels, seed, k=NEIGHBOURS):
    """Leave-one-out k-NN accuracy (majority of the k nearest other rows), precision@k (share of the k nearest with
    the row's label) and the silhouette of the labels, Euclidean in the space of `features` as given."""
    labels = np.asarray(labels)
    neighbours = labels[leave_one_out_neighbours(features, k)]  # (N, k)
    votes = np.array([majority(row) for row in neighbours])
    return {
        "knn_accuracy": float(np.mean(votes == labels)),
        "precision_at_k": float(np.mean(neighbours == labels[:, None])),
        "silhouette": silhouette(features, labels, seed),
    }


def chance_scores(labels):
    """What the labels alone give: the share of the commonest label (accuracy of always guessing it), and the
    precision@k of neighbours drawn at random from the other rows."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    n = counts.sum()
    return {
        "knn_accuracy": float(counts.max() / n),
        "precision_at_k": float((counts * (counts - 1)).sum() / (n * (n - 1))),
    }


def regression_scores(features, values, k=NEIGHBOURS):
    """Leave-one-out k-NN regression of numeric labels: each row predicted by the mean of its k nearest other rows
    (Euclidean in the space of `features`); R^2 against the labels' variance, and the mean absolute error."""
    values = np.asarray(values, dtype=np.float64)
    return prediction_scores(values, values[leave_one_out_neighbours(features, k)].mean(axis=1))


def regression_chance(values):
    """What the labels alone give: each row predicted by the mean of the other rows (R^2 a little below 0)."""
    values = np.asarray(values, dtype=np.float64)
    return prediction_scores(values, (values.sum() - values) / (len(values) - 1))


def prediction_scores(values, predicted):
    """{"r2": 1 - residual / total sum of squares (NaN for constant labels), "mae": mean absolute error}."""
    total = np.sum((values - values.mean()) ** 2)
    r2 = float(1 - np.sum((values - predicted) ** 2) / total) if total > 0 else float("nan")
    return {"r2": r2, "mae": float(np.mean(np.abs(predicted - values)))}


def compared_features(embeddings, spectrograms, seed):
    """The embeddings and the baselines an embedding of D values is compared with, each standardised (zero mean, unit
    variance per value), then rotated by PCA to at most D values (no whitening: a rotation keeps the distances):
    {"model": (N, D), "flattened spectrogram, PCA": (N, min(D, N)), "time-mean spectrum": (N, min(D, 3 F))}.

    spectrograms: (N, 3, F, T) of one length.
    """
    dim = embeddings.shape[1]
    flat = spectrograms.reshape(len(spectrograms), -1)
    spectrum = spectrograms.mean(axis=-1).reshape(len(spectrograms), -1)
    return {
        "model": standardised(embeddings),
        "flattened spectrogram, PCA": to_dim(standardised(flat), dim, seed),
        "time-mean spectrum": to_dim(standardised(spectrum), dim, seed),
    }


def to_dim(features, dim, seed):
    if features.shape[1] <= dim:
        return features
    return PCA(min(dim, *features.shape), random_state=seed).fit_transform(features)


GROUP_CHUNK = 1_024  # query rows whose distances to every row are held at a time by grouped_neighbours (N x 4 bytes)


def grouped_neighbours(features, groups, k=NEIGHBOURS):
    """(N, k) rows of each row's k nearest rows that share no value of any group column with it (the row itself
    included: it shares its own values), Euclidean; -1 where fewer than k rows are left. groups: list of (N,)
    arrays, e.g. the event and the network of each row: where a recording was made must not vote for its kind."""
    features = np.asarray(features, dtype=np.float32)
    codes = [np.unique(np.asarray(g).astype(str), return_inverse=True)[1] for g in groups]
    found = np.full((len(features), k), -1, dtype=np.int64)
    squared = (features**2).sum(axis=1)
    for start in range(0, len(features), GROUP_CHUNK):
        rows = np.arange(start, min(start + GROUP_CHUNK, len(features)))
        distances = squared[rows, None] - 2 * features[rows] @ features.T + squared[None, :]
        distances[rows - start, rows] = np.inf
        for code in codes:
            distances[code[rows, None] == code[None, :]] = np.inf
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        allowed = np.take_along_axis(distances, order, axis=1) < np.inf
        found[rows] = np.where(allowed, order, -1)
    return found


def grouped_label_scores(features, labels, groups, seed, k=NEIGHBOURS):
    """k-NN scores with every neighbour sharing a group value left out (grouped_neighbours): accuracy and balanced
    accuracy (mean recall per label: a label that most rows hold cannot carry it) of the majority of the k nearest
    allowed rows (fewer where fewer are left), over the rows that have one; and the adjusted mutual information of
    k-means clusters (K = the number of labels) with the labels and with each group column (named "ami_<name>").
    groups: {name: (N,) values}."""
    labels = np.asarray(labels).astype(str)
    neighbours = grouped_neighbours(features, list(groups.values()), k)
    # A row with fewer than k rows left (a small archive) votes with those it has; one with none is not scored.
    scored = np.flatnonzero(neighbours[:, 0] >= 0)
    votes = np.array([majority(labels[row[row >= 0]]) for row in neighbours[scored]], dtype=str)
    clusters = fit_kmeans(features, len(np.unique(labels)), seed).labels_
    scores = {
        "knn_accuracy": float(np.mean(votes == labels[scored])) if len(scored) else float("nan"),
        "balanced_accuracy": balanced(labels[scored], votes),
        "scored": int(len(scored)),
        "ami_labels": float(adjusted_mutual_info_score(labels, clusters)),
    }
    for name, values in groups.items():
        scores[f"ami_{name}"] = float(adjusted_mutual_info_score(np.asarray(values).astype(str), clusters))
    return scores


def balanced(truth, predicted):
    """Balanced accuracy (sklearn), NaN without rows; labels never predicted count as recall 0, as they should."""
    if not len(truth):
        return float("nan")
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": not a problem here
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(truth, predicted))


def grouped_chance(labels, groups):
    """The prior rule under the grouped protocol: always the commonest label (accuracy its share, balanced accuracy
    1 / the number of labels); k-means clusters carry no information (AMI 0) with the labels and each group."""
    counts = np.unique(np.asarray(labels).astype(str), return_counts=True)[1]
    chance = {"knn_accuracy": float(counts.max() / counts.sum()), "balanced_accuracy": 1 / len(counts)}
    return chance | {"ami_labels": 0.0} | {f"ami_{name}": 0.0 for name in groups}
