"""Train the convolutional autoencoder on STFT spectrograms of 3-component miniSEED files.

    python train.py                                          # shipped data, GPU if present
    python train.py --data_dir /archive/events --channels HH --num_epochs 50
    python train.py --resume checkpoints/<run>/last.pt --num_epochs 60
    tensorboard --logdir logs

Each run writes checkpoints/<run>/ (best_model.pt, last.pt, checkpoint_epoch_N.pt,
config.json, val_files.txt, skipped_files.json) and logs/<run>/ (TensorBoard events).
"""
import argparse
import logging
import os
import platform
import sys
from dataclasses import asdict
from datetime import datetime

import numpy as np
import obspy
import scipy
import torch
from matplotlib import colormaps
from torch.utils.data import DataLoader, Subset
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from model import ConvAutoencoder, load_checkpoint, masked_mse, resolve_device
from stft_dataset import (DEFAULT_FAMILIES, MINISEED_EXTENSIONS, SeismicSTFTDataset, SkipLog, STFTConfig,
                          atomic_write, pad_collate, write_json_atomic)

log = logging.getLogger("train")
NUM_IMAGES = 4  # fixed validation samples drawn to TensorBoard each epoch
# Settings that define a run: on --resume they come from the checkpoint, not the command line.
RUN_KEYS = ("channels", "extensions", "val_split", "seed", "nperseg", "noverlap", "nfft", "batch_size", "lr", "log_dir")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data_dir", default="data/filtered_waveforms", help="directory searched recursively for miniSEED files")
    add("--channels", nargs="+", default=list(DEFAULT_FAMILIES), help="channel families (band + instrument code) to train on")
    add("--extensions", nargs="+", default=list(MINISEED_EXTENSIONS), help="file extensions taken as miniSEED")
    add("--batch_size", type=int, default=16, help="spectrograms per batch")
    add("--num_epochs", type=int, default=30, help="total epochs (with --resume: including those already done)")
    add("--lr", type=float, default=1e-3, help="Adam learning rate")
    add("--num_workers", type=int, default=2, help="DataLoader worker processes (0 = load in the main process)")
    add("--val_split", type=float, default=0.2, help="fraction of files held out for validation")
    add("--seed", type=int, default=42, help="seed of the split, the initial weights and the shuffling")
    add("--nperseg", type=int, default=256, help="STFT window length in samples at 100 Hz")
    add("--noverlap", type=int, default=192, help="STFT window overlap in samples")
    add("--nfft", type=int, default=256, help="STFT FFT length (nfft // 2 + 1 frequency bins)")
    add("--checkpoint_dir", default="checkpoints", help="parent directory of the run's checkpoint folder")
    add("--log_dir", default="logs", help="parent directory of the run's TensorBoard folder")
    add("--save_every", type=int, default=5, help="write checkpoint_epoch_N.pt every this many epochs")
    add("--keep_checkpoints", type=int, default=3, help="periodic checkpoints kept (older ones removed; 0 keeps all)")
    add("--resume", metavar="PATH", help="checkpoint to continue (e.g. checkpoints/<run>/last.pt)")
    add("--device", default="auto", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    args = parser.parse_args(argv)
    problems = [f"--{name} must be {rule}" for name, ok, rule in [
        ("batch_size", args.batch_size >= 1, ">= 1"), ("num_epochs", args.num_epochs >= 1, ">= 1"),
        ("lr", args.lr > 0, "> 0"), ("num_workers", args.num_workers >= 0, ">= 0"),
        ("val_split", 0 < args.val_split < 1, "between 0 and 1"), ("save_every", args.save_every >= 1, ">= 1"),
        ("keep_checkpoints", args.keep_checkpoints >= 0, ">= 0")] if not ok]
    try:
        stft_config(args)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        parser.error("; ".join(problems))
    return parser, args


def stft_config(args):
    return STFTConfig(nperseg=args.nperseg, noverlap=args.noverlap, nfft=args.nfft)


def resume_settings(parser, args, checkpoint):
    """Take the run-defining settings from the checkpoint; warn where the command line differs."""
    saved = checkpoint["args"]
    for key in RUN_KEYS:
        given = getattr(args, key)
        if given != parser.get_default(key) and given != saved[key]:
            log.warning("--%s %s ignored: a resumed run keeps its checkpoint's value %s", key, given, saved[key])
        setattr(args, key, saved[key])
    if args.data_dir == parser.get_default("data_dir"):
        args.data_dir = saved["data_dir"]  # a different --data_dir is honoured: the data may have moved


def split_files(files, val_split, seed):
    """Reproducible train/validation split of relative paths: (train, val), both sorted."""
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(max(1, round(len(files) * val_split)), len(files) - 1)
    val = {files[i] for i in order[:n_val]}
    return [f for f in files if f not in val], sorted(val)


def new_run_name(checkpoint_dir):
    name = datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while os.path.exists(os.path.join(checkpoint_dir, name if suffix == 1 else f"{name}-{suffix}")):
        suffix += 1
    return name if suffix == 1 else f"{name}-{suffix}"


def train_epoch(model, loader, optimizer, device, skips, writer, epoch, step):
    """One pass over the training files; returns (mean loss over valid bins, global step)."""
    model.train()
    total, bins = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", unit="batch", leave=False, dynamic_ncols=True)
    for batch in bar:
        skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is None:
            continue
        x = batch["spectrogram"].to(device, non_blocking=True)  # (B, 3, F, T)
        mask = batch["mask"].to(device, non_blocking=True)  # (B, T)
        loss = masked_mse(model(x), x, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        n_bins = int(mask.sum())
        total, bins = total + loss.item() * n_bins, bins + n_bins
        writer.add_scalar("loss/train_step", loss.item(), step)
        bar.set_postfix(loss=f"{total / bins:.5f}")
    return (total / bins if bins else float("nan")), step


@torch.no_grad()
def evaluate(model, loader, device, skips):
    """MSE over all valid bins of the validation files."""
    model.eval()
    total, bins = 0.0, 0
    for batch in tqdm(loader, desc="validation", unit="batch", leave=False, dynamic_ncols=True):
        skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is None:
            continue
        x, mask = batch["spectrogram"].to(device), batch["mask"].to(device)
        n_bins = int(mask.sum())
        total, bins = total + masked_mse(model(x), x, mask).item() * n_bins, bins + n_bins
    return total / bins if bins else float("nan")


@torch.no_grad()
def log_images(model, batch, device, writer, epoch):
    """Input | reconstruction of the fixed validation samples; rows E, N, Z, low frequencies at the bottom."""
    model.eval()
    reconstruction = model(batch["spectrogram"].to(device)).clamp(0, 1).cpu().numpy()
    for k, meta in enumerate(batch["meta"]):
        n_time = int(batch["mask"][k].sum())
        x, r = batch["spectrogram"][k, :, :, :n_time].numpy(), reconstruction[k, :, :, :n_time]
        tile = np.concatenate([np.concatenate([x[c], r[c]], axis=1)[::-1] for c in range(len(x))], axis=0)
        file_id = os.path.splitext(os.path.basename(meta["path"]))[0]
        writer.add_image(f"reconstruction/{k}_{file_id}", colormaps["viridis"](tile)[..., :3], epoch, dataformats="HWC")


def save_checkpoint(state, path):
    atomic_write(path, lambda f: torch.save(state, f))


def save_epoch_checkpoints(checkpoint_state, run_dir, epoch, improved, args):
    """best_model.pt when improved, checkpoint_epoch_N.pt every --save_every epochs, last.pt always."""
    if improved:
        save_checkpoint(checkpoint_state, os.path.join(run_dir, "best_model.pt"))
    if epoch % args.save_every == 0:
        save_checkpoint(checkpoint_state, os.path.join(run_dir, f"checkpoint_epoch_{epoch}.pt"))
        prune_checkpoints(run_dir, args.keep_checkpoints)
    save_checkpoint(checkpoint_state, os.path.join(run_dir, "last.pt"))  # written last: resume from here


def prune_checkpoints(run_dir, keep):
    """Remove periodic checkpoints beyond the newest `keep` (0 keeps all)."""
    periodic = sorted((int(name[len("checkpoint_epoch_"):-3]), name) for name in os.listdir(run_dir)
                      if name.startswith("checkpoint_epoch_") and name.endswith(".pt"))
    for _, name in periodic[:-keep] if keep else []:
        os.remove(os.path.join(run_dir, name))


def package_versions():
    return {"python": platform.python_version(), "torch": torch.__version__, "obspy": obspy.__version__,
            "scipy": scipy.__version__, "numpy": np.__version__}


def plan_run(args, checkpoint, files):
    """Run name, run folder and split: new, or the checkpoint's (files added since then go to training)."""
    if checkpoint:
        run_name, run_dir = checkpoint["run_name"], os.path.dirname(os.path.abspath(args.resume))
        val_files = checkpoint["val_files"]
        held_out = set(val_files)
        train_files = [f for f in files if f not in held_out]
    else:
        run_name = new_run_name(args.checkpoint_dir)
        run_dir = os.path.join(args.checkpoint_dir, run_name)
        train_files, val_files = split_files(files, args.val_split, args.seed)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "val_files.txt"), "w") as f:
        f.write("".join(name + "\n" for name in val_files))
    return run_name, run_dir, train_files, val_files


def build_loaders(dataset, train_files, val_files, args, device):
    position = {f: i for i, f in enumerate(dataset.files)}
    missing = [f for f in val_files if f not in position]
    if missing:
        log.warning("%d validation files of this run are no longer in %s", len(missing), args.data_dir)
    train_set = Subset(dataset, [position[f] for f in train_files])
    val_set = Subset(dataset, [position[f] for f in val_files if f in position])
    generator = torch.Generator()
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=pad_collate,
                  pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, shuffle=True, generator=generator, **common)
    val_loader = DataLoader(val_set, shuffle=False, **common)
    return train_loader, val_loader, generator


def main(argv=None):
    """Train; returns a summary dict (best_val_loss, best_epoch, run_dir, log_dir, history, skipped)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser, args = parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.resume) if args.resume else None
        device = resolve_device(args.device)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    if checkpoint:
        resume_settings(parser, args, checkpoint)
    torch.manual_seed(args.seed)
    stft, skips = stft_config(args), SkipLog()
    try:
        dataset = SeismicSTFTDataset(args.data_dir, args.channels, stft, args.extensions, skips=skips)
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")
    if len(dataset) < 2:
        parser.exit(2, f"error: {len(dataset)} usable files of families {' '.join(args.channels)} in {args.data_dir}; "
                       "need at least 2 (one to train, one to validate)\n")

    run_name, run_dir, train_files, val_files = plan_run(args, checkpoint, dataset.files)
    train_loader, val_loader, generator = build_loaders(dataset, train_files, val_files, args, device)

    model = ConvAutoencoder().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = {"epoch": 0, "global_step": 0, "best_val_loss": float("inf"), "best_epoch": 0, "history": []}
    if checkpoint:
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        torch.set_rng_state(checkpoint["torch_rng_state"])
        state = {key: checkpoint[key] for key in state}
        log.info("resuming run %s after epoch %d", run_name, state["epoch"])
    log_dir = os.path.join(args.log_dir, run_name)
    writer = SummaryWriter(log_dir, purge_step=state["global_step"] + 1 if checkpoint else None)

    config = {"run_name": run_name, "args": vars(args), "stft_config": asdict(stft),
              "model_config": model.config.to_dict(), "num_parameters": sum(p.numel() for p in model.parameters()),
              "device": str(device), "versions": package_versions(),
              "dataset": {"usable_files": len(dataset), "train_files": len(train_files), "val_files": len(val_files),
                          "excluded_by_family": dict(dataset.excluded)}}
    log.info("run %s: %d train / %d validation files, device %s, %d parameters", run_name, len(train_files),
             len(val_files), device, config["num_parameters"])
    image_batch = pad_collate([val_loader.dataset[i] for i in range(min(NUM_IMAGES, len(val_loader.dataset)))])

    def save_run_files(epoch_state):
        config["skipped"] = skips.counts()
        write_json_atomic(os.path.join(run_dir, "config.json"), config)
        write_json_atomic(os.path.join(run_dir, "skipped_files.json"), skips.summary())
        return {**epoch_state, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                "model_config": model.config.to_dict(), "stft_config": asdict(stft), "args": vars(args),
                "run_name": run_name, "val_files": val_files, "torch_rng_state": torch.get_rng_state()}

    try:
        with logging_redirect_tqdm():
            for epoch in range(state["epoch"] + 1, args.num_epochs + 1):
                generator.manual_seed(args.seed + epoch)  # the same order whether or not the run was resumed
                train_loss, state["global_step"] = train_epoch(model, train_loader, optimizer, device, skips, writer,
                                                               epoch, state["global_step"])
                val_loss = evaluate(model, val_loader, device, skips)
                writer.add_scalar("loss/train", train_loss, epoch)
                writer.add_scalar("loss/val", val_loss, epoch)
                writer.add_scalar("learning_rate", optimizer.param_groups[0]["lr"], epoch)
                if image_batch["spectrogram"] is not None:
                    log_images(model, image_batch, device, writer, epoch)
                improved = val_loss < state["best_val_loss"]
                if improved:
                    state["best_val_loss"], state["best_epoch"] = val_loss, epoch
                state["epoch"] = epoch
                state["history"].append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
                log.info("epoch %d/%d  train %.5f  val %.5f%s", epoch, args.num_epochs, train_loss, val_loss,
                         "  (best)" if improved else "")
                save_epoch_checkpoints(save_run_files(state), run_dir, epoch, improved, args)
                writer.flush()
    except KeyboardInterrupt:
        writer.close()
        log.warning("interrupted; continue with: python train.py --resume %s --num_epochs %d",
                    os.path.join(run_dir, "last.pt"), args.num_epochs)
        sys.exit(130)

    log_hparams(writer, args, state)
    writer.close()
    save_run_files(state)
    report(state, run_dir, log_dir, skips, dataset)
    return {**state, "run_dir": run_dir, "log_dir": log_dir, "skipped": skips.counts()}


def log_hparams(writer, args, state):
    """Settings and final metrics into the run's own event file (HPARAMS tab), not a new sub-run."""
    metrics = {"hparam/best_val_loss": state["best_val_loss"], "hparam/best_epoch": state["best_epoch"]}
    values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
    for summary in hparams(values, metrics):
        writer.file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, state["epoch"])


def report(state, run_dir, log_dir, skips, dataset):
    print(f"best validation loss {state['best_val_loss']:.5f} at epoch {state['best_epoch']}")
    print(f"run directory {run_dir}  (TensorBoard: tensorboard --logdir {log_dir})")
    print(f"skipped files: {skips.describe()}")
    if dataset.excluded:
        print("left out by --channels: " + ", ".join(f"{n} {families}" for families, n in dataset.excluded.items()))


if __name__ == "__main__":
    main()
