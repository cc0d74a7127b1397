"""--clusters auto: a single outlier never becomes a cluster of its own (representation.size_floor)."""

import numpy as np

from embedding.representation import cluster, size_floor


def test_auto_k_keeps_the_size_floor_with_an_outlier():
    rng = np.random.default_rng(0)
    blobs = [rng.normal(centre, 0.3, size=(60, 4)) for centre in (0.0, 5.0, 10.0)]
    outlier = np.full((1, 4), 1000.0)  # alone it would give the best silhouette at K = 2: {180} and {1}
    features = np.concatenate([*blobs, outlier])
    kmeans, description = cluster(features, "auto", 0)
    sizes = np.bincount(kmeans.predict(features))
    assert sizes.min() >= size_floor(len(features))
    assert description["set_aside"] >= 1 and "set aside" in description["k_chosen_by"]


def test_size_floor_is_two_percent_or_five():
    assert size_floor(100) == 5
    assert size_floor(1000) == 20
