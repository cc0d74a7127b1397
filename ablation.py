"""Which training levers make the model transfer: train with each, evaluate on stations and networks it never saw.

    python ablation.py                                     # every lever, the 3 default folds: 3.5 hours on 2 cores
    python ablation.py --levers default --folds networks   # leave one network out, each network alone
    python ablation.py --levers default plain --folds NC   # a part of it
    python ablation.py --tables a.json b.json              # the tables of earlier --json runs again

Each fold holds some stations or networks of the shipped data out: `python train.py` runs on the other files
(its own station split inside them chooses the best epoch), then `python inference.py --split all` evaluates
the best checkpoint on the held-out files and on obspy's example recording (BW.RJOB, Germany, another
instrument), and again on copies of them cut shorter (CUTS): group "cut", their first 45-90 s (every number of
time bins from 72 to 142, where the shipped files are nearly all 142), and group "30 s", their first 30 s (48 bins,
a multiple of the model's stride of 16, like BW.RJOB). With the default folds every shipped network is held out
once; `--folds networks` holds each network out alone (leave one network out), training on all the others.
Each lever is one set of train.py flags, run on every fold before the next lever; the tables give mean MSE per
held-out group for the model, the time-mean and the blur baseline (baselines.py), and the ratios. Both scripts run
as a user runs them, in subprocesses. Then the embedding: event_noise_windows.py cuts 10 s event and noise windows
from the held-out files and embed.py --labels scores them (the checkpoint's read-out, the time-mean pooling, the
flattened spectrogram and the time-mean spectrum, 5-NN), and scores the held-out files against their channel family
(5-NN and the AMI of embed.py's clusters): one table per fold, and the mean over the folds.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import obspy
import pandas as pd
from sklearn.metrics import adjusted_mutual_info_score

from measuring.results import dated_path, markdown_table, write_results
from reading.file_index import DEFAULT_DATA_DIR
from running.settings import Setting, parse
from running.storage import write_json_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))
FOLDS = {  # held-out networks (NET) or stations (NET.STA)
    # the validation stations of python train.py's default split (--split_by station, --val_split 0.2, --seed 42)
    "stations": ("BK.BDM", "BK.BRIB", "CI.MLAC", "NC.GDXB", "NC.PSM", "PG.LM"),
    "NC": ("NC",),
    "not-NC": ("BK", "CI", "PG", "NN", "NP", "WR", "AZ", "TA"),
}
FOLDS.update({network: (network,) for network in FOLDS["not-NC"]})  # leave one network out: --folds networks
DEFAULT_FOLDS = ("stations", "NC", "not-NC")
LEAVE_ONE_NETWORK_OUT = ("NC", *FOLDS["not-NC"])
WINDOWS_10S = ["--window_seconds", "10", "--window_stride", "5", "--num_epochs", "30"]
LR_2E3 = ["--lr", "2e-3"]  # the default before 994a71c (lr 3e-3): the levers measured against it keep it
LEVERS = {  # train.py flags on top of its defaults; "default" is python train.py as shipped
    "default": [],
    "lr 2e-3 (the default before 994a71c)": LR_2E3,
    "lr 5e-3": ["--lr", "5e-3"],
    "seed 1": ["--seed", "1"],  # another split, initialisation and draws: how far one run is from the next
    "lr 2e-3, seed 1": [*LR_2E3, "--seed", "1"],
    "no floor: lr 2e-3, --noise_floor 0 (the default of 3c238b5)": [*LR_2E3, "--noise_floor", "0"],
    "interpolate, no tilt, no floor: lr 2e-3 (the default of cd02b08)": [
        *LR_2E3,
        *("--size_fit", "interpolate", "--spectral_tilt", "0", "--noise_floor", "0"),
    ],
    "plain (the first default): constant lr 1e-3, batch 16, 30 epochs, interpolate, no tilt, no floor": [
        *("--lr_schedule", "constant", "--lr", "1e-3", "--batch_size", "16", "--num_epochs", "30"),
        *("--size_fit", "interpolate", "--spectral_tilt", "0", "--noise_floor", "0"),
    ],
    "no tilt: lr 2e-3, --spectral_tilt 0": [*LR_2E3, "--spectral_tilt", "0"],
    "floor 0.7: lr 2e-3, --noise_floor 0.7": [*LR_2E3, "--noise_floor", "0.7"],
    "offsets: lr 2e-3, --offset_bins 15": [*LR_2E3, "--offset_bins", "15"],
    "crops: lr 2e-3, --crop_bins 40 142": [*LR_2E3, "--crop_bins", "40", "142"],
    "swap: lr 2e-3, --horizontal_swap 0.5": [*LR_2E3, "--horizontal_swap", "0.5"],
    "batch 16: lr 2e-3": [*LR_2E3, "--batch_size", "16"],
    "batch 4: lr 2e-3": [*LR_2E3, "--batch_size", "4"],
    "constant lr 1e-3": ["--lr_schedule", "constant", "--lr", "1e-3"],
    "arch stride8": ["--arch", "stride8"],
    "arch stride8, seed 1": ["--arch", "stride8", "--seed", "1"],
    "arch wide": ["--arch", "wide"],
    "windows 10 s (every 5 s, 30 epochs)": WINDOWS_10S,  # train on the length embedded (issue 21)
    "windows 10 s, seed 1 (every 5 s, 30 epochs)": [*WINDOWS_10S, "--seed", "1"],
    "min-max (the default before 2026-12-08)": ["--normalisation", "min-max"],  # the input before background-db
    "min-max, seed 1": ["--normalisation", "min-max", "--seed", "1"],
}
CUTS = {"cut": (45.0, 90.0), "30 s": (30.0, 30.0)}  # groups of held-out copies: their first 45-90 s (drawn per file)
GROUPS = ("all", *CUTS)  # every held-out file, and every one cut shorter
# embed.py --labels' rows beside the embedding: the time-mean pooling of the same latent, then the two baselines
REPRESENTATIONS = ("time-mean pooling", "flattened spectrogram, PCA", "time-mean spectrum")
SHORT = {name: name.split(" (")[0].split(":")[0] for name in LEVERS}


SETTINGS = (
    Setting("levers", list(SHORT.values()), "levers to run, by short name", nargs="+"),
    Setting(
        "folds",
        list(DEFAULT_FOLDS),
        f"folds to run: any of {', '.join(FOLDS)}; 'networks': each held out alone",
        nargs="+",
    ),
    Setting("work_dir", None, "where data links, checkpoints and results go (default: a temporary one)"),
    Setting("json", None, "also write every figure to this JSON file", metavar="PATH"),
    Setting("tables", None, "only print the tables of earlier --json files", nargs="+", metavar="JSON"),
    Setting("markdown", None, "also write the tables to DIR/<date>-ablation.md (a dated results file)", metavar="DIR"),
)


def parse_args(argv=None):
    parser, args = parse(__doc__, SETTINGS, argv)
    args.folds = list(
        dict.fromkeys(f for fold in args.folds for f in (LEAVE_ONE_NETWORK_OUT if fold == "networks" else [fold]))
    )
    unknown = [name for name in args.levers if name not in SHORT.values()] + [f for f in args.folds if f not in FOLDS]
    if unknown:
        parser.error(f"unknown lever or fold: {', '.join(unknown)} (levers: {', '.join(SHORT.values())})")
    return args


def network_of(name):
    return name.split(".")[0]


def station_of(name):
    return ".".join(name.split(".")[:2])


def link_fold(held_out, work_dir):
    """(training dir, held-out dir) of symbolic links to the shipped files (held out: those of the networks or
    stations in held_out), plus BW.RJOB in the held-out one."""
    train_dir, test_dir = os.path.join(work_dir, "train"), os.path.join(work_dir, "held_out")
    for folder in (train_dir, test_dir):
        os.makedirs(folder, exist_ok=True)
    shipped = os.path.join(ROOT, DEFAULT_DATA_DIR)
    for name in sorted(os.listdir(shipped)):
        if name.endswith(".mseed"):
            target = test_dir if {network_of(name), station_of(name)} & set(held_out) else train_dir
            if not os.path.exists(os.path.join(target, name)):
                os.symlink(os.path.join(shipped, name), os.path.join(target, name))
    obspy.read().write(os.path.join(test_dir, "BW.RJOB.EH.20090825T014000.mseed"), format="MSEED")
    return train_dir, test_dir


def cut_copies(test_dir, group, seed=0):
    """Copies of the held-out files beside test_dir, each cut to its first CUTS[group] seconds (drawn per file,
    seeded); a file shorter than the draw is copied whole. Returns their directory."""
    cut_dir = f"{test_dir}_{group.replace(' ', '')}"
    os.makedirs(cut_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in sorted(os.listdir(test_dir)):
        seconds = rng.uniform(*CUTS[group])
        if name.endswith(".mseed") and not os.path.exists(os.path.join(cut_dir, name)):
            stream = obspy.read(os.path.join(test_dir, name))
            start = min(trace.stats.starttime for trace in stream)
            stream.trim(start, start + seconds).write(os.path.join(cut_dir, name), format="MSEED")
    return cut_dir


def run_lever(flags, train_dir, test_dirs, out_dir):
    """Train with the flags, evaluate on each of test_dirs: ([metrics.json of each], training seconds)."""
    checkpoints = os.path.join(out_dir, "checkpoints")
    started = time.perf_counter()
    script("train.py", "--data_dir", train_dir, "--checkpoint_dir", checkpoints, "--log_dir", out_dir, *flags)
    seconds = time.perf_counter() - started
    (run,) = os.listdir(checkpoints)
    best = os.path.join(checkpoints, run, "best_model.pt")
    evaluations = []
    for k, test_dir in enumerate(test_dirs):
        results = os.path.join(out_dir, f"results_{k}" if k else "results")
        script("inference.py", best, "--split", "all", "--data_dir", test_dir, "--num_samples", "0", "--num_plots",
               "0", "--output_dir", results)  # fmt: skip
        with open(os.path.join(results, "metrics.json")) as f:
            evaluations.append(json.load(f))
    return evaluations, seconds, representation_scores(best, test_dirs[0], out_dir)


def representation_scores(best, test_dir, out_dir):
    """What the embeddings of the held-out files are worth, from embed.py's own label scores: event versus noise
    (event_noise_windows.py's 10 s windows of the held-out files, all of them and the clear ones of
    labels_clear.csv) for the default read-out, the time-mean pooling and the two baselines (leave-one-out 5-NN
    accuracy); the channel family (5-NN accuracy, lower: less instrument) and the adjusted mutual information of
    embed.py's clusters with it, on the held-out files whole."""
    windows = os.path.join(out_dir, "event_noise")
    script("event_noise_windows.py", "--data_dir", test_dir, "--output_dir", windows)
    for pooling in (None, "time-mean"):
        embed_scores(best, windows, os.path.join(windows, "labels.csv"), out_dir, pooling)
    embed_scores(best, windows, os.path.join(windows, "labels_clear.csv"), out_dir, name="event_noise_clear")
    embed_scores(best, test_dir, "family", out_dir)
    return read_representation(out_dir)


def read_representation(out_dir):
    """representation_scores' figures from the embed.py outputs under out_dir. The baselines are those of the
    default embedding's run: PCA to its number of values."""
    runs = ("event_noise_default", "event_noise_time-mean", "held_out_default", "event_noise_clear")
    events, pooled, files, clear = (os.path.join(out_dir, f"embed_{name}") for name in runs)  # embed_scores' folders
    scores = {f"event/noise: {who}": values for who, values in labels_json(events)["scores"].items()}
    pooled_scores = labels_json(pooled)["scores"]
    scores["event/noise: time-mean pooling"] = next(v for k, v in pooled_scores.items() if k.startswith("model"))
    scores |= {f"family: {who}": values for who, values in labels_json(files)["scores"].items()}
    catalog = pd.read_parquet(os.path.join(files, "catalog.parquet"))
    scores["cluster AMI with family"] = float(adjusted_mutual_info_score(catalog["family"], catalog["cluster"]))
    scores["clusters"] = int(catalog["cluster"].nunique())
    clear_labels = labels_json(clear)
    scores |= {f"clear event/noise: {who}": values for who, values in clear_labels["scores"].items()}
    scores["clear windows"] = clear_labels["recordings"]
    return scores


def labels_json(output_dir):
    with open(os.path.join(output_dir, "labels.json")) as f:
        return json.load(f)


def embed_scores(best, data_dir, labels, out_dir, pooling=None, name=None):
    """embed.py on data_dir with --labels, into out_dir/embed_<name> (default: <data_dir's name>_<pooling or
    default>)."""
    name = name or f"{os.path.basename(data_dir)}_{pooling or 'default'}"
    output_dir = os.path.join(out_dir, f"embed_{name}")
    flags = ["--projector_points", "0", "--num_anomalies", "0", *(["--pooling", pooling] if pooling else [])]
    script("embed.py", best, "--split", "all", "--data_dir", data_dir, "--labels", labels, "--output_dir", output_dir,
           *flags)  # fmt: skip


def script(*argv):
    """Run one of the repository's scripts as a user would; its output goes to out_dir's log, not here."""
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: {' '.join(argv[:2])} exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")


def by_network(metrics):
    """{network: {who: mean MSE}} of the evaluated files, plus "all" over every file."""
    groups = defaultdict(list)
    for sample in metrics["samples"]:
        groups[sample["trace_id"].split(".")[0]].append(sample)
        groups["all"].append(sample)
    return {net: mean_mse(samples) for net, samples in groups.items()}


def mean_mse(samples):
    """{"model", "baseline", "blur": mean over the samples of their overall MSE, "files": how many}."""
    means = {who: float(np.mean([s[who]["mse"]["overall"] for s in samples])) for who in ("model", "baseline", "blur")}
    return {**means, "files": len(samples)}


def tables(figures):
    """Markdown: a summary (each lever's ratios to both baselines, per fold and group), each lever and fold over all
    its held-out files, then each held-out network alone."""
    text = "model / t-mean and model / blur:\n\n" + summary_table(figures)
    if any("representation" in row for row in figures):
        text += "\nthe embedding on the held-out files (event/noise: 10 s windows; family: whole files):\n\n"
        text += representation_table(figures)
    if any("clear windows" in row.get("representation", {}) for row in figures):
        text += "\nevent/noise on the clear windows (labels_clear.csv: every event window shows its event):\n\n"
        text += clear_table(figures)
    columns = ["lever", "fold", "group", "files", "model", "t-mean", "blur", "/t-mean", "/blur", "train s"]
    for title, keep in (
        ("all held-out files", lambda net: net in GROUPS),
        ("per network", lambda net: net not in GROUPS),
    ):
        rows = [
            [row["lever"], row["fold"], net, v["files"], *(f"{v[who]:.5f}" for who in ("model", "baseline", "blur")),
             *(f"{r:.2f}" for r in baseline_ratios(v)), f"{row['train_s']:.0f}"]
            for row in figures
            for net, v in sorted(row["networks"].items())
            if keep(net)
        ]  # fmt: skip
        text += f"\n{title}:\n\n" + markdown_table(columns, rows)
    return text


def representation_table(figures):
    """One row per lever and fold (and the mean over the lever's folds): event versus noise 5-NN accuracy of the
    embedding, the time-mean pooling and both baselines, the embedding's margin over the better baseline, the family
    5-NN accuracies, the clusters' AMI with the family, and the reconstruction ratios."""
    columns = ["lever", "fold", "event/noise", "t-mean pool", "flat PCA", "t-mean spec", "margin", "family",
               "family flat", "family t-mean", "AMI (K)", "/t-mean", "/blur"]  # fmt: skip
    rows = [[row["lever"], row["fold"], *representation_values(row)] for row in figures if "representation" in row]
    return markdown_table(columns, [formatted(row) for row in with_lever_means(rows)])


def with_lever_means(rows):
    """Rows of [lever, fold, *numbers], then a "mean of N" row for each lever measured on more than one fold."""
    by_lever = defaultdict(list)
    for lever, _, *values in rows:
        by_lever[lever].append(values)
    return rows + [[lever, f"mean of {len(v)}", *np.mean(v, axis=0)] for lever, v in by_lever.items() if len(v) > 1]


def clear_table(figures):
    """One row per lever and fold (and the mean over the lever's folds): event versus noise 5-NN accuracy on the
    clear windows for the embedding and both baselines, and the embedding's margin over the better one."""
    rows = [
        [row["lever"], row["fold"], *clear_values(row["representation"])]
        for row in figures
        if "clear windows" in row.get("representation", {})
    ]
    cells = [
        [lever, fold, f"{n:.0f}", *(f"{v:.3f}" for v in values)] for lever, fold, n, *values in with_lever_means(rows)
    ]
    return markdown_table(["lever", "fold", "windows", "event/noise", "flat PCA", "t-mean spec", "margin"], cells)


def clear_values(scores):
    """The numbers of one clear_table row: windows, the 5-NN accuracies of the embedding and both baselines, margin."""
    accuracy = [next(v for k, v in scores.items() if k.startswith("clear event/noise: model"))["knn_accuracy"]]
    accuracy += [scores[f"clear event/noise: {who}"]["knn_accuracy"] for who in REPRESENTATIONS[1:]]
    return [scores["clear windows"], *accuracy, accuracy[0] - max(accuracy[1:])]


def formatted(row):
    """A representation_table row as text: 3 decimals, the AMI with its K in brackets."""
    lever, fold, *values = row
    *scores, ami, k, to_time_mean, to_blur = values
    cells = [f"{v:.3f}" for v in scores] + [f"{ami:.2f} ({k:g})", f"{to_time_mean:.2f}", f"{to_blur:.2f}"]
    return [lever, fold, *cells]


def representation_values(row):
    """The numbers of one representation_table row."""
    scores = row["representation"]
    accuracy = {key: value["knn_accuracy"] for key, value in scores.items() if isinstance(value, dict)}
    events = [next(v for k, v in accuracy.items() if k.startswith("event/noise: model"))]
    events += [accuracy[f"event/noise: {who}"] for who in REPRESENTATIONS]
    family = [next(v for k, v in accuracy.items() if k.startswith("family: model"))]
    family += [accuracy[f"family: {who}"] for who in REPRESENTATIONS[1:]]
    margin = events[0] - max(events[2:])
    ami, k = scores["cluster AMI with family"], scores["clusters"]
    return [*events, margin, *family, ami, k, *baseline_ratios(row["networks"]["all"])]


def baseline_ratios(means):
    """(model MSE / time-mean MSE, model MSE / blur MSE) of one group's means: the tables' /t-mean and /blur."""
    return means["model"] / means["baseline"], means["model"] / means["blur"]


def summary_table(figures):
    """One row per lever: model MSE / time-mean MSE and model MSE / blur MSE, per fold and group of files."""
    folds = list(dict.fromkeys(row["fold"] for row in figures))
    ratios = defaultdict(dict)
    for row in figures:
        for group in GROUPS:
            if group in row["networks"]:
                cell = " / ".join(f"{r:.2f}" for r in baseline_ratios(row["networks"][group]))
                ratios[row["lever"]][row["fold"], group] = cell
    columns = ["lever", *(f"{fold}: {group}" for fold in folds for group in GROUPS)]
    rows = [
        [lever, *(cells.get((fold, group), "") for fold in folds for group in GROUPS)]
        for lever, cells in ratios.items()
    ]
    return markdown_table(columns, rows)


def run_folds(args):
    """Every chosen lever trained and evaluated on every chosen fold: one figures row each, lever by lever (a run
    stopped part-way keeps whole levers)."""
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="ablation_")
    folds = {}
    for fold in args.folds:
        train_dir, test_dir = link_fold(FOLDS[fold], os.path.join(work_dir, fold))
        folds[fold] = train_dir, (test_dir, *(cut_copies(test_dir, group) for group in CUTS))
    figures = []
    for name, flags in LEVERS.items():
        if SHORT[name] not in args.levers:
            continue
        for fold, (train_dir, test_dirs) in folds.items():
            out_dir = os.path.join(work_dir, fold, SHORT[name])
            (metrics, *cuts), seconds, representation = run_lever(flags, train_dir, test_dirs, out_dir)
            figures.append({"lever": SHORT[name], "flags": flags, "fold": fold, "train_s": seconds})
            figures[-1]["representation"] = representation
            cut_means = {group: mean_mse(cut["samples"]) for group, cut in zip(CUTS, cuts)}
            figures[-1]["networks"] = {**by_network(metrics), **cut_means}
            print(f"{SHORT[name]}, fold {fold}: {figures[-1]['networks']['all']} ({seconds:.0f} s)", flush=True)
            if args.json:  # after every run: a run stopped part-way keeps what it measured
                write_json_atomic(args.json, figures)
    return figures


def read_figures(paths):
    figures = []
    for path in paths:
        with open(path) as f:
            figures += json.load(f)
    return figures


def main(argv=None):
    args = parse_args(argv)
    figures = read_figures(args.tables) if args.tables else run_folds(args)
    text = tables(figures)
    print(text)
    if args.markdown:
        title = "ablation.py: model / baselines on held-out stations and networks"
        print(f"wrote {write_results(dated_path(args.markdown, 'ablation'), title, text)}")
    return figures


if __name__ == "__main__":
    main()
