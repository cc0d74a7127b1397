"""Start-up probes that bench.py runs in a new Python process, so that imports and the index count as a user sees them.

    python -m measuring.startup_probe first_batch DATA_DIR    # the index and a DataLoader as train.py uses them
    python -m measuring.startup_probe first_windows SDS_ROOT  # 60 s windows every 30 s of an archive of 1 Hz day files

Each prints one line of figures that bench.py reads (wall-clock end, counts, CPU seconds, memory).
"""

import time

IMPORTS_STARTED = time.process_time()

import resource  # noqa: E402  (imports after the clock: their cost is measured)
import sys  # noqa: E402

from torch.utils.data import DataLoader  # noqa: E402

from stft_dataset import SeismicSTFTDataset, pad_collate  # noqa: E402

IMPORTED = time.process_time()


def first_batch(data_dir):
    """end time, samples, CPU s of the imports, CPU s of building the dataset from the index."""
    dataset = SeismicSTFTDataset(data_dir)
    indexed = time.process_time()
    next(iter(DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2, collate_fn=pad_collate)))
    return time.time(), len(dataset), IMPORTED, indexed - IMPORTED


def first_windows(root):
    """end time, windows, stations, bytes of the window arrays, peak RSS (kB), CPU s of the dataset."""
    dataset = SeismicSTFTDataset(root, families=("LH",), window_seconds=60, window_stride=30)
    keys, codes = dataset.groups("station")
    cpu = time.process_time() - IMPORTED
    arrays = dataset.sample_recording.nbytes + dataset.sample_start.nbytes + codes.nbytes
    return time.time(), len(dataset), len(keys), arrays, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cpu


if __name__ == "__main__":
    probe = {"first_batch": first_batch, "first_windows": first_windows}[sys.argv[1]]
    print(*probe(sys.argv[2]))
