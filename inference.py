"""Evaluate a trained autoencoder: reconstruction plots, metrics.json and a table against two baselines.

    python inference.py checkpoints/<run>/best_model.pt                  # the run's validation files
    python inference.py checkpoints/<run>/best_model.pt --split all --data_dir /new/events
    torchrun --standalone --nproc_per_node 4 inference.py checkpoints/<run>/best_model.pt --split all --num_samples 0

Under torchrun each process evaluates a contiguous share of the samples and rank 0 writes metrics.json in the order
of one process (shards.py), with "processes".

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

from embedding.baselines import BASELINES
from embedding.figures import plot_reconstruction, sample_name
from model import masked_errors
from reading.batching import LengthBatchSampler, reconstruct
from reading.waveforms import COMPONENTS
from running.checkpoints import chosen_windows, data_settings, model_from_checkpoint
from running.device import device_and_checkpoint, model_input
from running.distributed import (
    gather_in_rank_order,
    gather_skips,
    own_share,
    planned_order,
    rank_and_world_size,
    rank_zero_first,
    run_script,
)
from running.settings import (
    CHECKPOINT,
    CHECKPOINT_DATA_DIR,
    RunError,
    Setting,
    at_least,
    device_setting,
    parse,
    window_settings,
)
from running.storage import write_json_atomic
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate

log = logging.getLogger("inference")
WHO = ("model", *BASELINES)  # the reconstructions compared, as keys of metrics.json
LABELS = {"model": "model", "baseline": "time-mean", "blur": "blur"}  # their names in the printed table


SETTINGS = (
    CHECKPOINT,
    CHECKPOINT_DATA_DIR,
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
def evaluate_files(model, dataset, share, device, batch_size, skips):
    """Per-sample metrics for model and baselines of this process's share: [(position, sample)], in reading order.

    Batches hold files of one length (batching.py), so a file's figures do not depend on which files are evaluated.
    """
    sampler = LengthBatchSampler(dataset.time_bins(), batch_size, share)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate)
    samples = []
    for batch in loader:
        skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is None:
            continue
        x, mask = model_input(batch["spectrogram"], device), batch["mask"].to(device)
        references = {"model": reconstruct(model, x, mask), **{who: make(x, mask) for who, make in BASELINES.items()}}
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
            samples.append((meta["index"], sample))
    return samples


@torch.no_grad()
def plot_samples(model, dataset, evaluated, device, output_dir):
    """reconstruction_<i>_<file>.png of each (position, sample) given, the model run on the sample alone."""
    for i, (position, sample) in enumerate(evaluated):
        spectrogram, meta = dataset[position]
        x = model_input(spectrogram[None], device)
        file_id = sample_name(sample["path"], sample["starttime"] if dataset.window_seconds else None)
        figure = plot_reconstruction(
            x[0].cpu().numpy(), model(x)[0].cpu().numpy(), dataset.stft, file_id, meta["native_rate"]
        )
        figure.savefig(os.path.join(output_dir, f"reconstruction_{i}_{file_id}.png"), dpi=80)


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
    """Evaluate; returns the metrics dict written to metrics.json (rank 0; None on the other torchrun processes)."""
    parser, args = parse_args(argv)
    return run_script(parser, args, evaluate_checkpoint)


def open_dataset(args, settings, skips):
    """The dataset of --data_dir as the run read its data; rank 0 indexes first."""
    window_seconds, window_stride = chosen_windows(args, settings)
    with rank_zero_first():
        return SeismicSTFTDataset(
            args.data_dir or settings["data_dir"],
            settings["families"],
            settings["stft"],
            settings["extensions"],
            skips=skips,
            window_seconds=window_seconds,
            window_stride=window_stride,
        )


def evaluate_checkpoint(args, device):
    """Rebuild model and data pipeline from the checkpoint, evaluate (each process its share), write metrics.json
    and figures on rank 0."""
    _, checkpoint = device_and_checkpoint(str(device), args.checkpoint)
    model = model_from_checkpoint(checkpoint, device).eval()
    settings, skips = data_settings(checkpoint), SkipLog()
    dataset = open_dataset(args, settings, skips)
    positions = choose_files(dataset, checkpoint, args)
    if not positions:
        raise RunError(
            f"no usable files of families {' '.join(settings['families'])} for --split {args.split} in "
            f"{dataset.data_dir}"
        )
    os.makedirs(args.output_dir, exist_ok=True)
    share = own_share(planned_order(dataset.time_bins(), args.batch_size, positions))
    evaluated = evaluate_files(model, dataset, share, device, args.batch_size, skips)
    gather_skips(skips)
    shares = gather_in_rank_order(evaluated)
    if shares is None:  # not rank 0: its share is with rank 0
        return None
    evaluated = [pair for share in shares for pair in share]
    if not evaluated:
        raise RunError(f"none of the {len(positions)} chosen files could be read (see the warnings above)")
    plot_samples(model, dataset, evaluated[: args.num_plots], device, args.output_dir)
    samples = [sample for _, sample in evaluated]
    metrics = {
        "checkpoint": args.checkpoint,
        "epoch": checkpoint.get("epoch"),
        "data_dir": dataset.data_dir,
        "split": args.split,
        "num_samples": len(samples),
        "processes": rank_and_world_size()[1],
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
