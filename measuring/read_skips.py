"""python -m measuring.read_skips DATA_DIR: which samples of a folder SeismicSTFTDataset reads, and which it skips and
why, every sample read once (what train.py and embed.py would meet); written to a dated results file.

--code DIR reads the folder with the stft_dataset.py (and its modules) of another checkout, e.g. one at an older
commit, so that a change's before and after are counted by the same script; the table names that checkout's commit.
The file index goes to a temporary folder (never into DATA_DIR).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from collections import Counter

from measuring.results import ROOT, dated_path, markdown_table, write_results
from reading.waveforms import DEFAULT_FAMILIES

EXAMPLES = 3  # messages shown per reason


def count_skips(data_dir, families, window_seconds, code):
    """(samples, Counter of header skips by reason, Counter of read skips by reason, {reason: [messages]})."""
    sys.path.insert(0, code)  # the checkout whose stft_dataset.py reads (ROOT by default)
    from stft_dataset import SeismicSTFTDataset

    with tempfile.TemporaryDirectory() as scratch:
        dataset = SeismicSTFTDataset(
            data_dir,
            families=families,
            index_path=os.path.join(scratch, "index.npz"),
            window_seconds=window_seconds,
        )
        on_reading, messages = Counter(), {}
        for i in range(len(dataset)):
            spectrogram, meta = dataset[i]
            if spectrogram is None:
                on_reading[meta["skip_reason"]] += 1
                messages.setdefault(meta["skip_reason"], []).append(meta["message"])
    return len(dataset), Counter(dataset.skips.counts()), on_reading, messages


def code_commit(code):
    found = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def report(args, n_samples, on_headers, on_reading, messages):
    """Markdown body: the counts, then the skips by reason with a few of their messages."""
    read = n_samples - sum(on_reading.values())
    body = (
        f"Folder `{args.data_dir}`, families {', '.join(args.families)}, "
        f"{f'windows of {args.window_seconds:g} s' if args.window_seconds else 'whole recordings'}, "
        f"read by the code of commit {code_commit(args.code)}.\n\n"
        + markdown_table(
            ["samples (recordings or windows)", "read", "unusable on reading", "files skipped by their headers"],
            [[n_samples, read, n_samples - read, sum(on_headers.values())]],
        )
    )
    rows = [["on reading", reason, n, "; ".join(messages[reason][:EXAMPLES])] for reason, n in on_reading.items()]
    rows += [["headers (files)", reason, count, ""] for reason, count in on_headers.items()]
    return body + "\n" + markdown_table(["where", "reason", "count", "examples"], sorted(rows)) if rows else body


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES))
    parser.add_argument("--window_seconds", type=float, default=None)
    parser.add_argument("--code", default=ROOT, help="checkout whose stft_dataset.py reads the folder")
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "results"))
    parser.add_argument("--name", default="read-skips", help="results file name after the date")
    args = parser.parse_args(argv)
    counts = count_skips(args.data_dir, tuple(args.families), args.window_seconds, os.path.abspath(args.code))
    body = report(args, *counts)
    print(body)
    path = write_results(dated_path(args.results_dir, args.name), "Samples read and skipped", body)
    print(f"written {path}")


if __name__ == "__main__":
    main()
