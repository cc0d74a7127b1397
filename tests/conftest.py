"""Shared fixtures: small directories of the real recordings shipped in data/filtered_waveforms."""

import os
import shutil
import sys

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHIPPED = os.path.join(ROOT, "data", "filtered_waveforms")
INCOMPLETE = os.path.join(ROOT, "tests", "data", "incomplete")  # real single-component (??Z only) windows


def shipped_files(families=("HH", "HN", "EH", "BH"), per_family=2):
    """Names of real shipped files, `per_family` of each family (named NET.STA.FAMILY.TIME.mseed)."""
    names = sorted(os.listdir(SHIPPED))
    return [name for family in families for name in [n for n in names if n.split(".")[2] == family][:per_family]]


def flags(**values):
    """Command-line arguments: flags(num_epochs="1", data_dir=d) -> ["--num_epochs", "1", "--data_dir", d]."""
    return [text for name, value in values.items() for text in (f"--{name}", str(value))]


def copy_files(names, directory, source=SHIPPED):
    os.makedirs(directory, exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(source, name), directory)
    return str(directory)


@pytest.fixture
def real_dir(tmp_path):
    """8 real 90 s, 3-component files: 2 each of HH, HN, EH, BH."""
    return copy_files(shipped_files(), tmp_path / "waveforms")


@pytest.fixture
def train_dir(tmp_path):
    """12 real files (3 per default family) for short training runs."""
    return copy_files(shipped_files(per_family=3), tmp_path / "train_waveforms")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs of several epochs, torchrun, fault runs (-m 'not slow' skips them)")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 1-epoch run on 12 real files (3 per default family), shared by the tests of the scripts that read a
    checkpoint: (checkpoint path, data_dir)."""
    import train  # noqa: PLC0415  (imported here: most test modules never need it)

    base = tmp_path_factory.mktemp("run")
    data_dir = copy_files(shipped_files(per_family=3), base / "waveforms")
    run_flags = flags(data_dir=data_dir, num_epochs=1, batch_size=4, num_workers=0, val_split=0.5)
    summary = train.main(run_flags + flags(checkpoint_dir=base / "checkpoints", log_dir=base / "logs"))
    return os.path.join(summary["run_dir"], "best_model.pt"), data_dir


class SearchIndex:
    """The reference search of the vector index and float16 tests: nearest rows by Euclidean distance between
    standardised embeddings, scikit-learn brute force (similar.py's search before vector_index.py)."""

    def __init__(self, embeddings, chunk=20_000):
        self.scaler = StandardScaler()
        for start in range(0, len(embeddings), chunk):
            self.scaler.partial_fit(np.asarray(embeddings[start : start + chunk], dtype=np.float32))
        scaled = np.concatenate([self.scale(embeddings[i : i + chunk]) for i in range(0, len(embeddings), chunk)])
        self.neighbours = NearestNeighbors(algorithm="brute").fit(scaled)
        self.size = len(embeddings)

    def scale(self, embeddings):
        return self.scaler.transform(np.asarray(embeddings, dtype=np.float32)).astype(np.float32)

    def nearest(self, queries, k):
        """(distances (Q, k), rows (Q, k)) of the k nearest catalogue rows to each query embedding, nearest first."""
        return self.neighbours.kneighbors(self.scale(queries), n_neighbors=min(k, self.size))
