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
    assert description["set_aside"] >= 1 and f"{size_floor(len(features))} rows or more" in description["k_chosen_by"]
    assert description["set_aside_rows"] == [180]  # the outlier, listed for the atlas


def test_size_floor_is_two_percent_or_five():
    assert size_floor(100) == 5
    assert size_floor(1000) == 20


def test_auto_k_on_fewer_rows_than_two_clusters_of_the_floor_gives_two():
    features = np.random.default_rng(1).normal(size=(7, 4))  # floor 5: no K of clusters >= 5 rows fits in 7
    kmeans, description = cluster(features, "auto", 0)
    assert description["k"] == 2 and "keeps every cluster" in description["k_chosen_by"]
    assert len(np.unique(kmeans.predict(features))) == 2
