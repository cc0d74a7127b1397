"""Kinds of seismic sources (landslides, rockfalls, debris flows, avalanches) told apart: train, embed and score.

    python sources.py --checkpoint checkpoints/<run>/best_model.pt      # score a trained model on exotic_events
    python sources.py --num_epochs 20 --cache_dir /tmp/cache            # train the default recipe on it first
    python sources.py --checkpoint C --poolings readout time-mean       # + other read-outs of the same model

The data: a folder of recordings and a labels CSV (path,label and group columns; default ../shared/data/
exotic_events and its labels.csv, whose README keeps the catalogue's notice). Without --checkpoint, `python
train.py` runs the default recipe on the folder with no labels. Then, for each pooling and each protocol,
`python embed.py --labels CSV --groups ...` scores the model and its two baselines (the flattened spectrogram
and the time-mean spectrum, standardised, PCA to the same size): 5-NN accuracy and balanced accuracy with every
neighbour that shares a group value with the query left out, and the AMI of k-means clusters (K = the number of
labels) with the labels and each group column. Protocols: the event and the network held out (where a recording
was made predicts its kind, docs/embeddings.md), and the event alone. Both scripts run as a user runs them, in
subprocesses; the tables go to a dated results file (results.py).
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile

from measuring.results import dated_path, markdown_table, write_results
from running.settings import RunError, Setting, at_least, parse

DATA_DIR = os.path.join("..", "shared", "data", "exotic_events")
PROTOCOLS = {"event and network held out": ["eventid", "network"], "event held out": ["eventid"]}

SETTINGS = (
    Setting("data_dir", DATA_DIR, "folder of recordings (per-channel files at any rate are fine)"),
    Setting("labels", None, "CSV of path,label and the group columns (default: DATA_DIR/labels.csv)"),
    Setting("checkpoint", None, "score this checkpoint (default: train the default recipe on --data_dir first)"),
    Setting("num_epochs", 20, "epochs of the training run (without --checkpoint)", int, check=at_least(1)),
    Setting("cache_dir", None, "spectrogram cache of train.py and embed.py"),
    Setting("train_flags", "", "more flags of train.py, one string: --train_flags='--seed 1 --nyquist_band'"),
    Setting(
        "poolings", ["readout"], "embed.py --pooling values scored ('readout' or embedding.POOLINGS keys)", nargs="+"
    ),  # fmt: skip
    Setting("work_dir", None, "where runs and embeddings go (default: a temporary folder, removed)"),
    Setting("results_dir", "results", "where the dated results file goes"),
    Setting("seed", 0, "seed of embed.py's clustering and PCA", int),
)


def run(script, *flags):
    """python SCRIPT FLAGS in a subprocess, as a user runs it; RunError naming it when it fails."""
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script), *map(str, flags)]
    print("$", " ".join(command[1:]), flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(done.stdout[-3000:], flush=True)
    if done.returncode:
        raise RunError(f"{script} failed (exit {done.returncode}): see its output above")
    return done.stdout


def trained(args, work_dir):
    """The checkpoint scored: --checkpoint, or the best of the default recipe trained on --data_dir."""
    if args.checkpoint:
        return args.checkpoint
    flags = ["--data_dir", args.data_dir, "--num_epochs", args.num_epochs]
    flags += ["--checkpoint_dir", os.path.join(work_dir, "checkpoints"), "--log_dir", os.path.join(work_dir, "logs")]
    flags += ["--cache_dir", args.cache_dir] if args.cache_dir else []
    run("train.py", *flags, *shlex.split(args.train_flags))
    runs = sorted(os.listdir(os.path.join(work_dir, "checkpoints")))
    return os.path.join(work_dir, "checkpoints", runs[-1], "best_model.pt")


def scored(args, checkpoint, pooling, groups, output_dir):
    """labels.json of embed.py --labels --groups on --data_dir with the given pooling."""
    flags = [checkpoint, "--data_dir", args.data_dir, "--labels", args.labels, "--groups", *groups]
    flags += ["--pooling", pooling, "--output_dir", output_dir, "--projector_points", 0, "--num_anomalies", 0]
    run("embed.py", *flags, "--seed", args.seed, *(["--cache_dir", args.cache_dir] if args.cache_dir else []))
    with open(os.path.join(output_dir, "labels.json")) as f:
        return json.load(f)


def table(result):
    """Markdown rows of one labels.json: each representation, then the chance row."""
    groups = result["groups"]
    header = ["features", "dim", "5-NN accuracy", "balanced", "AMI with the label"]
    header += [f"AMI with {g}" for g in groups]
    rows = []
    for who, s in [*result["scores"].items(), ("chance (the commonest label)", result["chance"])]:
        cells = [s["knn_accuracy"], s["balanced_accuracy"], s["ami_labels"], *(s[f"ami_{g}"] for g in groups)]
        rows.append([who, s.get("dim", ""), *(f"{v:.3f}" for v in cells)])
    return markdown_table(header, rows)


def main(argv=None):
    _, args = parse(__doc__, SETTINGS, argv)
    args.labels = args.labels or os.path.join(args.data_dir, "labels.csv")
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = args.work_dir or scratch
        checkpoint = trained(args, work_dir)
        body = f"Checkpoint `{checkpoint}`; data `{args.data_dir}`, labels `{args.labels}`.\n\n"
        for pooling in args.poolings:
            for protocol, groups in PROTOCOLS.items():
                output_dir = os.path.join(work_dir, "embeddings", f"{pooling}-{'-'.join(groups)}")
                result = scored(args, checkpoint, pooling, groups, output_dir)
                body += f"## pooling {pooling}, {protocol}: {result['recordings']} recordings\n\n{table(result)}\n"
    path = write_results(dated_path(args.results_dir, "sources"), "Kinds of sources: exotic_events", body)
    print(f"written {path}")
    return path


if __name__ == "__main__":
    try:
        main()
    except RunError as err:
        sys.exit(f"sources.py: {err}")
