"""Shared fixtures: small directories of the real recordings shipped in data/filtered_waveforms."""

import os
import shutil
import sys

import pytest

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
    config.addinivalue_line("markers", "slow: takes a minute or more on 2 cores; deselect with -m 'not slow'")
