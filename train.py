"""Train the convolutional autoencoder on STFT spectrograms of 3-component miniSEED files.

    python train.py                                          # shipped data, GPU if present
    python train.py --data_dir /archive/events --channels HH --num_epochs 50
    python train.py --data_dir /archive/events --cache_dir /scratch/stft_cache --amp auto --num_workers 8
    python train.py --resume checkpoints/<run>/last.pt --num_epochs 60
    torchrun --standalone --nproc_per_node 4 train.py --data_dir /archive/events    # 4 GPUs, one machine
    tensorboard --logdir logs

Under torchrun every process trains on its own part of each epoch (DistributedDataParallel); only
rank 0 writes checkpoints and logs. Each run writes checkpoints/<run>/ (best_model.pt, last.pt,
checkpoint_epoch_N.pt, config.json, val_files.txt, skipped_files.json) and logs/<run>/ (TensorBoard).
"""
import argparse
import logging
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import datetime, timedelta
from functools import partial

import numpy as np
import obspy
import scipy
import torch
import torch.distributed as dist
from matplotlib import colormaps
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from model import ConvAutoencoder, clean_state_dict, load_checkpoint, masked_mse, resolve_device
from stft_dataset import (COMPONENTS, DEFAULT_FAMILIES, MINISEED_EXTENSIONS, SeismicSTFTDataset, SkipLog, STFTConfig,
                          atomic_write, pad_collate, write_json_atomic)

log = logging.getLogger("train")
NUM_IMAGES = 4  # fixed validation samples drawn to TensorBoard each epoch
PREFETCH_BATCHES = 4  # batches each DataLoader worker prepares ahead
PREPARE_MINUTES = 60  # how long processes wait for rank 0 to index and cache the data (torchrun)
PROGRESS_EVERY = 20  # steps between progress-bar loss updates (each one waits for the GPU)
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
    add("--cache_dir", help="store spectrograms here once (float16, about 109 kB per 90 s file) and read them "
                            "back each epoch instead of decoding miniSEED; off when not given")
    add("--amp", choices=("off", "auto", "bf16", "fp16"), default="off",
        help="mixed precision: 'auto' is bf16 where supported, else fp16 (with a gradient scaler)")
    add("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
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


def model_input(spectrogram, device):
    """A batch's (B, 3, F, T) spectrograms as the model takes them: on the device, channels_last, float32.

    The cache's float16 is converted after the copy, so half the bytes cross to the GPU.
    """
    return spectrogram.to(device, non_blocking=True, memory_format=torch.channels_last).float()


def train_epoch(model, loader, optimizer, scaler, autocast, device, skips, epoch, distributed=False):
    """One pass over this process's training files.

    Returns ((sum over batches of loss x valid bins, valid bins, samples), per-step losses).
    Losses stay on the device until the epoch ends: reading one waits for the GPU.
    """
    model.train()
    total, bins, samples, step_losses = torch.zeros((), dtype=torch.float64, device=device), 0, 0, []
    bar = tqdm(loader, desc=f"epoch {epoch} train", unit="batch", leave=False, dynamic_ncols=True,
               disable=not is_rank_zero())
    for batch in bar:
        skips.add_batch(batch["skipped"])
        x, mask = batch["spectrogram"], batch["mask"]  # (B, 3, F, T), (B, T)
        placeholder = x is None
        if placeholder:
            if not distributed:
                continue
            # Every process must join each gradient all-reduce: with no usable file, a zero loss on a
            # placeholder, in eval mode so that BatchNorm statistics learn nothing from it.
            x, mask = torch.zeros(1, len(COMPONENTS), 32, 32), torch.zeros(1, 32, dtype=torch.bool)
            model.eval()
        n_bins = int(mask.sum())  # counted on the CPU copy: no wait for the GPU
        x = model_input(x, device)
        mask = mask.to(device, non_blocking=True)
        with autocast():
            reconstruction = model(x)
        if placeholder:
            model.train()
        loss = masked_mse(reconstruction.float(), x, mask) if n_bins else reconstruction.float().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if n_bins:
            total += loss.detach() * n_bins
            bins, samples = bins + n_bins, samples + len(batch["meta"])
            step_losses.append(loss.detach())
            if len(step_losses) % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.5f}")
    return (total, bins, samples), step_losses


@torch.no_grad()
def evaluate(model, loader, autocast, device, skips):
    """(sum over batches of MSE x valid bins, valid bins) over this process's validation files."""
    model.eval()
    total, bins = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in tqdm(loader, desc="validation", unit="batch", leave=False, dynamic_ncols=True,
                      disable=not is_rank_zero()):
        skips.add_batch(batch["skipped"])
        if batch["spectrogram"] is None:
            continue
        n_bins = int(batch["mask"].sum())
        x = model_input(batch["spectrogram"], device)
        with autocast():
            reconstruction = model(x)
        total += masked_mse(reconstruction.float(), x, batch["mask"].to(device, non_blocking=True)) * n_bins
        bins += n_bins
    return total, bins


def sum_over_processes(values, device):
    """Sums over all processes of each value (floats or 0-d tensors), in one all-reduce."""
    sums = torch.stack([torch.as_tensor(value, dtype=torch.float64).to(device) for value in values])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums.tolist()


def mean_loss(total, bins):
    return total / bins if bins else float("nan")


@torch.no_grad()
def log_images(model, batch, device, writer, epoch):
    """Input | reconstruction of the fixed validation samples; rows E, N, Z, low frequencies at the bottom."""
    model.eval()
    spectrograms = batch["spectrogram"].float()
    reconstruction = model(model_input(spectrograms, device)).clamp(0, 1).cpu().numpy()
    for k, meta in enumerate(batch["meta"]):
        n_time = int(batch["mask"][k].sum())
        x, r = spectrograms[k, :, :, :n_time].numpy(), reconstruction[k, :, :, :n_time]
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


def init_distributed(device_name):
    """(rank, world size, device). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) this process
    joins the process group: NCCL with one GPU per process, gloo on CPU."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world_size, local_rank = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Long timeout: the other processes wait at a barrier while rank 0 indexes (and caches) a large archive.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=PREPARE_MINUTES))
    return rank, world_size, device


def is_rank_zero():
    return not dist.is_initialized() or dist.get_rank() == 0


def from_rank_zero(value):
    """Rank 0's value on every process (e.g. the run name, which holds the time)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_skips(skips):
    """Every process reads different files: each SkipLog gets the unusable files found by all of them."""
    if dist.is_initialized():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, [(path, *entry) for path, entry in skips.files.items()])
        for entries in found:
            skips.add_batch(entries)


def epoch_seed(seed, epoch, rank):
    """Independent seed per (run seed, epoch, process): resumed runs repeat it, processes never share it."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def mixed_precision(amp, device):
    """--amp -> (autocast context factory, GradScaler, dtype name). Only fp16 needs the scaler."""
    if amp == "auto":
        amp = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    autocast = partial(torch.autocast, device.type, dtype=dtype) if dtype else nullcontext
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), amp


def load_dataset(args, stft, skips):
    """Rank 0 indexes (and caches) first; the other processes then find the index and cache stored."""
    if not is_rank_zero():
        dist.barrier()
    dataset = SeismicSTFTDataset(args.data_dir, args.channels, stft, args.extensions, skips=skips,
                                 cache_dir=args.cache_dir)
    if dist.is_initialized() and is_rank_zero():
        dist.barrier()
    return dataset


def plan_run(args, checkpoint, files):
    """Run name, run folder and split: new, or the checkpoint's (files added since then go to training)."""
    if checkpoint:
        run_name, run_dir = checkpoint["run_name"], os.path.dirname(os.path.abspath(args.resume))
        val_files = checkpoint["val_files"]
        held_out = set(val_files)
        train_files = [f for f in files if f not in held_out]
    else:
        run_name = from_rank_zero(new_run_name(args.checkpoint_dir) if is_rank_zero() else None)
        run_dir = os.path.join(args.checkpoint_dir, run_name)
        train_files, val_files = split_files(files, args.val_split, args.seed)
    if is_rank_zero():
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "val_files.txt"), "w") as f:
            f.write("".join(name + "\n" for name in val_files))
    return run_name, run_dir, train_files, val_files


def build_loaders(dataset, train_files, val_files, args, device):
    """(train loader, validation loader, train sampler): this process's share of each, in index arrays."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    position = {f: i for i, f in enumerate(dataset.files)}
    missing = [f for f in val_files if f not in position]
    if missing:
        log.warning("%d validation files of this run are no longer in %s", len(missing), args.data_dir)
    train_set = Subset(dataset, np.array([position[f] for f in train_files], dtype=np.int64))
    val_indices = np.array([position[f] for f in val_files if f in position], dtype=np.int64)
    # Each validation file exactly once over all processes (DistributedSampler would repeat files to even out).
    val_set = Subset(dataset, val_indices[rank::world_size])
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    common = loader_options(args.batch_size, args.num_workers, device)
    return DataLoader(train_set, sampler=sampler, **common), DataLoader(val_set, **common), sampler


def loader_options(batch_size, num_workers, device):
    """DataLoader settings of every loader here and in bench.py: workers kept up between epochs, each
    preparing PREFETCH_BATCHES ahead; pinned memory for fast, non-blocking copies to a GPU."""
    workers = dict(num_workers=num_workers, persistent_workers=True, prefetch_factor=PREFETCH_BATCHES) \
        if num_workers else {}
    return dict(batch_size=batch_size, collate_fn=pad_collate, pin_memory=device.type == "cuda", **workers)


def main(argv=None):
    """Train; returns a summary dict (best_val_loss, best_epoch, run_dir, log_dir, history, skipped)."""
    parser, args = parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.resume) if args.resume else None
        rank, world_size, device = init_distributed(args.device)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    # Other processes report errors only; rank 0 merges their skipped files into its own report.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return train(parser, args, checkpoint, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(parser, args, checkpoint, device):
    if checkpoint:
        resume_settings(parser, args, checkpoint)
    rank = dist.get_rank() if dist.is_initialized() else 0
    stft, skips = stft_config(args), SkipLog()
    try:
        dataset = load_dataset(args, stft, skips)
    except OSError as err:  # a missing --data_dir; a --cache_dir that cannot be written (full, read-only)
        parser.exit(2, f"error: {err}\n")
    if len(dataset) < 2:
        parser.exit(2, f"error: {len(dataset)} usable files of families {' '.join(args.channels)} in {args.data_dir}; "
                       "need at least 2 (one to train, one to validate)\n")

    run_name, run_dir, train_files, val_files = plan_run(args, checkpoint, dataset.files.tolist())
    train_loader, val_loader, sampler = build_loaders(dataset, train_files, val_files, args, device)

    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = ConvAutoencoder().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    autocast, scaler, amp = mixed_precision(args.amp, device)
    state = restore(checkpoint, model, optimizer, scaler)
    forward, trained = wrap_for_training(model, args.compile, device)
    log_dir = os.path.join(args.log_dir, run_name)
    writer = SummaryWriter(log_dir, purge_step=state["global_step"] + 1 if checkpoint else None) if rank == 0 else None

    config = {"run_name": run_name, "args": vars(args), "stft_config": asdict(stft),
              "model_config": model.config.to_dict(), "num_parameters": sum(p.numel() for p in model.parameters()),
              "device": str(device), "processes": dist.get_world_size() if dist.is_initialized() else 1,
              "amp": amp, "versions": package_versions(),
              "dataset": {"usable_files": len(dataset), "train_files": len(train_files), "val_files": len(val_files),
                          "excluded_by_family": dict(dataset.excluded)}}
    log.info("run %s: %d train / %d validation files, device %s x %d, %d parameters, amp %s", run_name,
             len(train_files), len(val_files), device, config["processes"], config["num_parameters"], amp)
    first_val_files = np.flatnonzero(np.isin(dataset.files, val_files))[:NUM_IMAGES]
    image_batch = pad_collate([dataset[i] for i in first_val_files]) if rank == 0 else None

    def checkpoint_state():
        config["skipped"] = skips.counts()
        write_json_atomic(os.path.join(run_dir, "config.json"), config)
        write_json_atomic(os.path.join(run_dir, "skipped_files.json"), skips.summary())
        return {**state, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                "scaler_state": scaler.state_dict(), "model_config": model.config.to_dict(), "stft_config": asdict(stft),
                "args": vars(args), "run_name": run_name, "val_files": val_files}

    try:
        with logging_redirect_tqdm():
            for epoch in range(state["epoch"] + 1, args.num_epochs + 1):
                torch.manual_seed(epoch_seed(args.seed, epoch, rank))  # DataLoader worker seeds, per process
                sampler.set_epoch(epoch)  # the same order whether or not the run was resumed
                started = time.perf_counter()
                sums, step_losses = train_epoch(trained, train_loader, optimizer, scaler, autocast, device, skips,
                                                epoch, dist.is_initialized())
                total, bins, samples = sum_over_processes(sums, device)
                share_batchnorm_statistics(model)
                train_loss, samples_per_s = mean_loss(total, bins), samples / (time.perf_counter() - started)
                val_loss = mean_loss(*sum_over_processes(evaluate(forward, val_loader, autocast, device, skips), device))
                gather_skips(skips)
                improved = val_loss < state["best_val_loss"]
                if improved:
                    state["best_val_loss"], state["best_epoch"] = val_loss, epoch
                state["epoch"] = epoch
                state["history"].append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
                log.info("epoch %d/%d  train %.5f  val %.5f  %.0f samples/s%s", epoch, args.num_epochs, train_loss,
                         val_loss, samples_per_s, "  (best)" if improved else "")
                first_step = state["global_step"] + 1
                state["global_step"] += len(step_losses)
                if rank == 0:
                    write_epoch_scalars(writer, epoch, first_step, step_losses, train_loss, val_loss, optimizer,
                                        samples_per_s)
                    if image_batch["spectrogram"] is not None:
                        log_images(model, image_batch, device, writer, epoch)
                    save_epoch_checkpoints(checkpoint_state(), run_dir, epoch, improved, args)
                    writer.flush()
    except KeyboardInterrupt:
        if writer:
            writer.close()
        command = "the same torchrun command with" if dist.is_initialized() else "python train.py"
        log.warning("interrupted; continue with: %s --resume %s --num_epochs %d", command,
                    os.path.join(run_dir, "last.pt"), args.num_epochs)
        sys.exit(130)

    if rank == 0:
        log_hparams(writer, args, state)
        writer.close()
        checkpoint_state()
        report(state, run_dir, log_dir, skips, dataset)
    return {**state, "run_dir": run_dir, "log_dir": log_dir, "skipped": skips.counts()}


def restore(checkpoint, model, optimizer, scaler):
    """Weights, optimizer and scaler from the checkpoint (if any); returns the run state to continue."""
    state = {"epoch": 0, "global_step": 0, "best_val_loss": float("inf"), "best_epoch": 0, "history": []}
    if not checkpoint:
        return state
    model.load_state_dict(clean_state_dict(checkpoint["model_state"]))
    optimizer.load_state_dict(checkpoint["optimizer_state"])
    if scaler.is_enabled() and "scaler_state" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler_state"])
    log.info("resuming run %s after epoch %d", checkpoint["run_name"], checkpoint["epoch"])
    return {key: checkpoint[key] for key in state}


def wrap_for_training(model, compile_model, device):
    """(module to evaluate: compiled or not, module to train: that one wrapped in DDP under torchrun).

    Both share model's weights, so checkpoints always hold the plain model's state dict.
    """
    forward = torch.compile(model) if compile_model else model
    if not dist.is_initialized():
        return forward, forward
    return forward, DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)


def share_batchnorm_statistics(model):
    """Rank 0's BatchNorm running statistics to every process, so that all validate the model rank 0 saves.

    DDP copies them only at the start of the next training step; until then each process holds those
    of its own last batch.
    """
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def write_epoch_scalars(writer, epoch, first_step, step_losses, train_loss, val_loss, optimizer, samples_per_s):
    for step, loss in enumerate(torch.stack(step_losses).tolist() if step_losses else [], start=first_step):
        writer.add_scalar("loss/train_step", loss, step)
    writer.add_scalar("loss/train", train_loss, epoch)
    writer.add_scalar("loss/val", val_loss, epoch)
    writer.add_scalar("learning_rate", optimizer.param_groups[0]["lr"], epoch)
    writer.add_scalar("speed/train_samples_per_s", samples_per_s, epoch)


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
