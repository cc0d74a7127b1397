"""What embeddings are good for, with scikit-learn: clusters, a 2-D map, nearest neighbours, and how well they
separate labels compared with baselines computed from the spectrograms themselves.

Every method works in one space: the embeddings standardised (zero mean, unit variance per dimension), so that no
dimension dominates by its scale. Clustering reduces that space with PCA first; the map is its first two principal
components (a linear map: fitted on a sample, it places 132k points in seconds, where t-SNE would take hours on a CPU).
"""

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

CLUSTER_COMPONENTS = 32  # principal components the clustering works in
AUTO_K = range(2, 13)  # K tried by --clusters auto
FIT_SAMPLE = 20_000  # rows that the scaler, PCA and KMeans are fitted on (all rows are assigned)
SILHOUETTE_SAMPLE = 5_000  # rows the silhouette is computed on
NEIGHBOURS = 5  # k of the k-nearest-neighbour scores


def fit_sample(n_rows, seed, size=FIT_SAMPLE):
    """Sorted row numbers of a random sample of at most `size` rows."""
    if n_rows <= size:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size, replace=False))


def reduce(embeddings, seed):
    """(pipeline standardise -> PCA fitted on a sample, reduced embeddings (N, components))."""
    sample = fit_sample(len(embeddings), seed)
    components = min(CLUSTER_COMPONENTS, embeddings.shape[1], len(sample))
    pipeline = make_pipeline(StandardScaler(), PCA(components, random_state=seed)).fit(embeddings[sample])
    return pipeline, transform_in_chunks(pipeline, embeddings)


def transform_in_chunks(pipeline, embeddings, chunk=20_000):
    return np.concatenate([pipeline.transform(embeddings[i : i + chunk]) for i in range(0, len(embeddings), chunk)])


def silhouette(features, labels, seed):
    """Silhouette of labels on at most SILHOUETTE_SAMPLE rows; nan when there are fewer than 2 labels."""
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return float("nan")
    size = min(SILHOUETTE_SAMPLE, len(labels))
    return float(silhouette_score(features, labels, sample_size=size, random_state=seed))


def cluster(reduced, k, seed):
    """KMeans on the reduced embeddings, K given or ("auto") the best silhouette over AUTO_K.

    Returns (labels (N,), distance of each row to its centre (N,), description: method, K, how chosen, scores).
    """
    sample = fit_sample(len(reduced), seed)
    if k == "auto":
        tried = [n for n in AUTO_K if n < len(sample)]
        scores = {n: silhouette(reduced[sample], fit_kmeans(reduced[sample], n, seed).labels_, seed) for n in tried}
        k = max(scores, key=scores.get)
        chosen = f"highest silhouette over K = {tried[0]}..{tried[-1]}"
    else:
        scores, chosen = {}, "given (--clusters)"
    kmeans = fit_kmeans(reduced[sample], k, seed)
    labels = kmeans.predict(reduced)
    distances = np.linalg.norm(reduced - kmeans.cluster_centers_[labels], axis=1)
    method = f"KMeans (k-means++, 10 starts) on {reduced.shape[1]} principal components of the standardised embeddings"
    description = {"method": method, "k": int(k), "k_chosen_by": chosen, "silhouette_by_k": scores}
    description["silhouette"] = silhouette(reduced, labels, seed)
    return labels, distances, description


def fit_kmeans(features, k, seed):
    return KMeans(k, n_init=10, random_state=seed).fit(features)


def standardised(features):
    return StandardScaler().fit_transform(features)


class SearchIndex:
    """Nearest recordings by Euclidean distance between standardised embeddings (scikit-learn, brute force: trees
    do not help in hundreds of dimensions). The scaler is fitted chunk by chunk; the index holds one float32 copy."""

    def __init__(self, embeddings, chunk=20_000):
        self.scaler = StandardScaler()
        for start in range(0, len(embeddings), chunk):
            self.scaler.partial_fit(embeddings[start : start + chunk])
        scaled = np.concatenate([self.scale(embeddings[i : i + chunk]) for i in range(0, len(embeddings), chunk)])
        self.neighbours = NearestNeighbors(algorithm="brute").fit(scaled)
        self.size = len(embeddings)

    def scale(self, embeddings):
        return self.scaler.transform(np.asarray(embeddings)).astype(np.float32)

    def nearest(self, queries, k):
        """(distances (Q, k), rows (Q, k)) of the k nearest catalogue rows to each query embedding, nearest first."""
        return self.neighbours.kneighbors(self.scale(queries), n_neighbors=min(k, self.size))


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
    predicted = values[leave_one_out_neighbours(features, k)].mean(axis=1)
    return {"r2": r_squared(values, predicted), "mae": float(np.mean(np.abs(predicted - values)))}


def regression_chance(values):
    """What the labels alone give: each row predicted by the mean of the other rows (R^2 a little below 0)."""
    values = np.asarray(values, dtype=np.float64)
    predicted = (values.sum() - values) / (len(values) - 1)
    return {"r2": r_squared(values, predicted), "mae": float(np.mean(np.abs(predicted - values)))}


def r_squared(values, predicted):
    total = np.sum((values - values.mean()) ** 2)
    return float(1 - np.sum((values - predicted) ** 2) / total) if total > 0 else float("nan")


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
