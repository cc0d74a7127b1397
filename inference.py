"""Evaluate a trained autoencoder: reconstruction plots, metrics.json and a table against two baselines.

    python inference.py checkpoints/<run>/best_model.pt                  # the run's validation files
    python inference.py checkpoints/<run>/best_model.pt --split all --data_dir /new/events

Model, STFT and normalisation settings come from the checkpoint. Beside the model's figures stand two
baselines (baselines.py): the time-mean one repeats each sample's time-averaged spectrum over time, and
the blur one is each sample average-pooled 8 x 8 and scaled back up. A model that does not beat them has
learned no more than each record's average spectral shape, or no finer detail than a coarse copy.
"""

import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from baselines import BASELINES
from batching import LengthBatchSampler, reconstruct
from checkpoints import chosen_windows, data_settings, model_from_checkpoint
from device import device_and_checkpoint, model_input
from figures import plot_reconstruction
from model import masked_errors
from settings import CHECKPOINT, RunError, Setting, at_least, device_setting, parse, window_settings
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate
from storage import write_json_atomic
from waveforms import COMPONENTS

log = logging.getLogger("inference")
WHO = ("model", *BASELINES)  # the reconstructions compared, as keys of metrics.json
LABELS = {"model": "model", "baseline": "time-mean", "blur": "blur"}  # their names in the printed table


SETTINGS = (
    CHECKPOINT,
    Setting("data_dir", None, "directory of miniSEED files (default: the checkpoint's)"),
    Setting(
        "split",
        "val",
        "'val': the run's validation samples; 'all': every usable one of --data_dir",
        choices=("val", "all"),
    ),
    Setting("num_samples", 20, "samples drawn at random to evaluate (0 = all)", int, check=at_least(0)),
    Setting("num_plots", 20, "reconstruction figures saved (of the evaluated samples)", int, check=at_least(0)),
    Setting("output_dir", "inference_results", "where PNG files and metrics.json go"),
    Setting("batch_size", 16, "spectrograms per forward pass", int, check=at_least(1)),
    Setting("seed", 0, "seed of the random choice of samples", int),
    *window_settings("evaluate"),
    device_setting(),
)


def parse_args(argv=None):
    return parse(__doc__, SETTINGS, argv)


def choose_files(dataset, checkpoint, args):
    """Positions in `dataset` of the samples (files or windows) to evaluate."""
    settings = data_settings(checkpoint)
    candidates = dataset.split_positions(args.split, settings["split_by"], settings["val_groups"]).tolist()
    if args.split == "val":
        present = set(dataset.files.tolist())
        gone = [f for f in checkpoint["val_files"] if f not in present]
        if gone:
            log.warning(
                "%d of the run's %d validation files are not usable in %s",
                len(gone),
                len(checkpoint["val_files"]),
                dataset.data_dir,
            )
    rng = np.random.default_rng(args.seed)
    if args.num_samples and args.num_samples < len(candidates):
        candidates = sorted(rng.choice(candidates, size=args.num_samples, replace=False).tolist())
    return candidates


@torch.no_grad()
def evaluate_files(model, dataset, positions, args, device, stft, skips):
    """Per-sample metrics for model and baseline; saves up to --num_plots figures.

    Batches hold files of one length (batching.py), so a file's figures do not depend on which files are evaluated.
    """
    sampler = LengthBatchSampler(dataset.time_bins(), args.batch_size, positions)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate)
    samples = []
    for batch in loader:
        skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is None:
            continue
        x, mask = model_input(batch["spectrogram"], device), batch["mask"].to(device)
        reconstruction = reconstruct(model, x, mask)
        references = {"model": reconstruction, **{who: make(x, mask) for who, make in BASELINES.items()}}
        errors = {
            (who, metric): masked_errors(reference, x, mask, power)
            for who, reference in references.items()
            for metric, power in (("mse", 2), ("mae", 1))
        }
        for k, meta in enumerate(batch["meta"]):
            sample = {
                "path": os.path.relpath(meta["path"], dataset.data_dir),
                "trace_id": meta["trace_id"],
                "starttime": meta["starttime"],
                **{who: {} for who in WHO},
            }
            for (who, metric), values in errors.items():
                sample[who][metric] = {**dict(zip(COMPONENTS, values[k].tolist())), "overall": values[k].mean().item()}
            samples.append(sample)
            if len(samples) <= args.num_plots:
                n_time = int(mask[k].sum())
                file_id = os.path.splitext(os.path.basename(meta["path"]))[0]
                figure = plot_reconstruction(
                    x[k, :, :, :n_time].cpu().numpy(), reconstruction[k, :, :, :n_time].cpu().numpy(), stft, file_id
                )
                figure.savefig(
                    os.path.join(args.output_dir, f"reconstruction_{len(samples) - 1}_{file_id}.png"), dpi=80
                )
    return samples


def summarise(samples):
    """Means over files of each per-file figure: {who: {metric: {"E", "N", "Z", "overall"}}}."""
    return {
        who: {
            metric: {key: float(np.mean([s[who][metric][key] for s in samples])) for key in (*COMPONENTS, "overall")}
            for metric in ("mse", "mae")
        }
        for who in WHO
    }


def print_table(metrics):
    """Three rows per file (model, time-mean baseline, blur baseline), then the means: MSE and MAE per component
    and overall."""
    keys = (*COMPONENTS, "overall")
    labels = (*COMPONENTS, "all")
    print(
        f"{'file':36} {'':9} "
        + " ".join(f"{'MSE ' + k:>8}" for k in labels)
        + "  "
        + " ".join(f"{'MAE ' + k:>8}" for k in labels)
    )
    rows = [(s["path"][-36:], s) for s in metrics["samples"]] + [(f"mean of {metrics['num_samples']} files", metrics)]
    for name, values in rows:
        for who in WHO:
            print(
                f"{name if who == 'model' else '':36} {LABELS[who]:9} "
                + " ".join(f"{values[who]['mse'][k]:8.5f}" for k in keys)
                + "  "
                + " ".join(f"{values[who]['mae'][k]:8.5f}" for k in keys)
            )


def main(argv=None):
    """Evaluate; returns the metrics dict written to metrics.json."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser, args = parse_args(argv)
    try:
        return evaluate_checkpoint(args)
    except (FileNotFoundError, RunError) as err:
        parser.exit(2, f"error: {err}\n")


def evaluate_checkpoint(args):
    """Rebuild model and data pipeline from the checkpoint, evaluate, write metrics.json and figures."""
    device, checkpoint = device_and_checkpoint(args.device, args.checkpoint)
    model = model_from_checkpoint(checkpoint, device).eval()
    settings = data_settings(checkpoint)
    data_dir, stft, families = args.data_dir or settings["data_dir"], settings["stft"], settings["families"]
    skips = SkipLog()
    window_seconds, window_stride = chosen_windows(args, settings)
    dataset = SeismicSTFTDataset(
        data_dir,
        families,
        stft,
        settings["extensions"],
        skips=skips,
        window_seconds=window_seconds,
        window_stride=window_stride,
    )
    positions = choose_files(dataset, checkpoint, args)
    if not positions:
        raise RunError(f"no usable files of families {' '.join(families)} for --split {args.split} in {data_dir}")
    os.makedirs(args.output_dir, exist_ok=True)
    samples = evaluate_files(model, dataset, positions, args, device, stft, skips)
    if not samples:
        raise RunError(f"none of the {len(positions)} chosen files could be read (see the warnings above)")
    metrics = {
        "checkpoint": args.checkpoint,
        "epoch": checkpoint.get("epoch"),
        "data_dir": data_dir,
        "split": args.split,
        "num_samples": len(samples),
        **summarise(samples),
        "skipped": skips.summary(),
        "samples": samples,
    }
    write_json_atomic(os.path.join(args.output_dir, "metrics.json"), metrics)
    print_table(metrics)
    print(f"skipped files: {skips.describe()}")
    print(f"{min(len(samples), args.num_plots)} figures and metrics.json in {args.output_dir}")
    return metrics


if __name__ == "__main__":
    main()
