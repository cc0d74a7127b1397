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
SIGTERM or SIGUSR1 (a preempted job) ends the step in progress, writes last.pt with the position in the
epoch and exits with 143 or 138; --resume continues from that step exactly.
"""

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
from matplotlib import colormaps
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm.contrib.logging import logging_redirect_tqdm

from augment import (
    batch_rng,
    random_horizontal_swap,
    random_noise_floor,
    random_spectral_tilt,
    random_time_crop,
    random_time_offset,
)
from checkpoints import checkpoint_dict, newest_intact, restore, resume_point, save_checkpoint, save_epoch_checkpoints
from file_index import DEFAULT_DATA_DIR
from model import ARCHS, DEFAULT_ARCH, SIZE_FITS, ConvAutoencoder, ModelConfig
from preemption import Preempted, SkipFirst, StepCheck, StopSignals
from recordings import SPLITS, choose_val_groups, in_groups, window_problems
from runtime import (
    RunError,
    epoch_seed,
    from_rank_zero,
    gather_skips,
    init_distributed,
    is_rank_zero,
    loader_options,
    mixed_precision,
    model_input,
    package_versions,
    rank_and_world_size,
    script_parser,
    share_batchnorm_statistics,
    sum_over_processes,
    wrap_for_training,
)
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate
from storage import atomic_write, probe_writable, write_json_atomic
from training import (
    BATCH_SIZE,
    CROP_BINS,
    HORIZONTAL_SWAP,
    LR,
    NOISE_FLOOR,
    NUM_EPOCHS,
    OFFSET_BINS,
    ONE_CYCLE_END,
    ONE_CYCLE_START,
    ONE_CYCLE_WARMUP,
    SPECTRAL_TILT,
    WEIGHT_DECAY,
    evaluate,
    mean_loss,
    one_cycle,
    train_epoch,
)
from transform import STFTConfig
from waveforms import DEFAULT_FAMILIES, MINISEED_EXTENSIONS

log = logging.getLogger("train")
NUM_IMAGES = 4  # fixed validation samples drawn to TensorBoard each epoch
SAVE_EVERY_MINUTES = 10  # --save_every_minutes: what a kill without warning may cost a long epoch
# Settings that define a run: on --resume they come from the checkpoint, not the command line.
RUN_KEYS = (
    *("channels", "extensions", "val_split", "seed", "nperseg", "noverlap", "nfft", "batch_size", "lr", "log_dir"),
    *("lr_schedule", "crop_bins", "offset_bins", "weight_decay", "spectral_tilt", "noise_floor", "size_fit"),
    *("horizontal_swap", "arch"),
    *("window_seconds", "window_stride", "split_by"),
)
# What runs written before a RUN_KEYS flag existed did, for resuming them.
BEFORE_FLAG = {
    "lr_schedule": "constant",
    "crop_bins": [0, 0],
    "offset_bins": 0,
    "weight_decay": 0.0,
    "split_by": "file",
    "spectral_tilt": 0.0,
    "noise_floor": 0.0,
    "horizontal_swap": 0.0,
    "size_fit": "interpolate",
    "arch": "seed",
}
SPLIT_BY = "station"  # --split_by default: no station on both sides, so the validation loss is one on unseen stations


def parse_args(argv=None):
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--data_dir", default=DEFAULT_DATA_DIR, help="directory searched recursively for miniSEED files")
    add("--channels", nargs="+", default=list(DEFAULT_FAMILIES), help="channel families (band + instrument) to use")
    add("--extensions", nargs="+", default=list(MINISEED_EXTENSIONS), help="file extensions taken as miniSEED")
    add("--batch_size", type=int, default=BATCH_SIZE, help="spectrograms per batch")
    add("--num_epochs", type=int, default=NUM_EPOCHS, help="total epochs (with --resume: including those already done)")
    add("--lr", type=float, default=LR, help="Adam learning rate (with --lr_schedule onecycle: the peak)")
    add(
        "--lr_schedule",
        choices=("onecycle", "constant"),
        default="onecycle",
        help=f"'onecycle': cosine rise from --lr / {1 / ONE_CYCLE_START:.0f} to --lr over the first "
        f"{ONE_CYCLE_WARMUP * 100:.0f}%% of the steps, cosine fall to --lr / {1 / ONE_CYCLE_END:.0f}; "
        "'constant': --lr throughout",
    )
    add("--weight_decay", type=float, default=WEIGHT_DECAY, help="AdamW weight decay (0: plain Adam)")
    add(
        "--crop_bins",
        nargs=2,
        type=int,
        default=list(CROP_BINS),
        metavar=("MIN", "MAX"),
        help="training batches only: random time windows of MIN to MAX bins, normalised again (default 0 0: no "
        "cropping; crops did not make the model transfer better, see the README's Generalisation section)",
    )
    add(
        "--offset_bins",
        type=int,
        default=OFFSET_BINS,
        metavar="MAX",
        help="training batches only: drop 0 to MAX time bins at a random place, normalised again, so that the model "
        "trains on every length modulo its stride of 16 (15 covers them all; 0: off; not with --crop_bins)",
    )
    add(
        "--spectral_tilt",
        type=float,
        default=SPECTRAL_TILT,
        metavar="MAX",
        help="training batches only: a random instrument response f ** p per sample, its slope drawn in [-MAX, "
        "MAX] (a fraction of the log10 range per decade of frequency; 0.15 is about p = 1; 0: off)",
    )
    add(
        "--noise_floor",
        type=float,
        default=NOISE_FLOOR,
        metavar="MAX",
        help="training batches only: noise power added to every bin at a random level in [0, MAX] of the log10 range "
        "(a noisier site or instrument), normalised again (0: off)",
    )
    add(
        "--horizontal_swap",
        type=float,
        default=HORIZONTAL_SWAP,
        metavar="P",
        help="training batches only: E and N exchanged in each sample with probability P (a station whose horizontal "
        "sensors are turned by 90 degrees; 0: off)",
    )
    add(
        "--size_fit",
        choices=SIZE_FITS,
        default=ModelConfig.size_fit,
        help="how a spectrogram meets the model, whose layers halve it 4 times (--arch stride8: 3): 'pad' (repeat the "
        "last bins at least once, up to a multiple of 16 (8), crop the output) or 'interpolate' (resize the output: "
        "the seed model, which shifts bins by a length-dependent stretch)",
    )
    add(
        "--arch",
        choices=list(ARCHS),
        default=DEFAULT_ARCH,
        help="encoder widths (the decoder mirrors them): "
        + ", ".join(
            f"'{name}' ({' '.join(map(str, w))}, latent F/{2 ** len(w)} x T/{2 ** len(w)})" for name, w in ARCHS.items()
        )
        + "; stored in the checkpoint",
    )
    add("--num_workers", type=int, default=2, help="DataLoader worker processes (0 = load in the main process)")
    add("--val_split", type=float, default=0.2, help="fraction of samples held out for validation")
    add(
        "--split_by",
        choices=SPLITS,
        default=SPLIT_BY,
        help=f"what the validation split keeps on one side (default {SPLIT_BY}): 'file' (every window of a file), "
        "'station' (every file and window of a station), 'network', or 'time' (whole UTC days; samples that "
        "cross midnight into a day of the other side are used on neither)",
    )
    add(
        "--window_seconds",
        type=float,
        help="cut every recording into windows of this many seconds, one sample each (default: off, one "
        "sample per file; files over 600 s are then skipped)",
    )
    add("--window_stride", type=float, help="seconds from one window's start to the next (default: --window_seconds)")
    add("--seed", type=int, default=42, help="seed of the split, the initial weights and the shuffling")
    add("--nperseg", type=int, default=256, help="STFT window length in samples at 100 Hz")
    add("--noverlap", type=int, default=192, help="STFT window overlap in samples")
    add("--nfft", type=int, default=256, help="STFT FFT length (nfft // 2 + 1 frequency bins)")
    add("--checkpoint_dir", default="checkpoints", help="parent directory of the run's checkpoint folder")
    add("--log_dir", default="logs", help="parent directory of the run's TensorBoard folder")
    add("--save_every", type=int, default=5, help="write checkpoint_epoch_N.pt every this many epochs")
    add("--keep_checkpoints", type=int, default=3, help="periodic checkpoints kept (older ones removed; 0 keeps all)")
    add("--save_every_steps", type=int, default=0, help="also write last.pt every N batches of an epoch (0: off)")
    add(
        "--save_every_minutes",
        type=float,
        default=SAVE_EVERY_MINUTES,
        help="also write last.pt in an epoch once this many minutes have passed since the last save (0: off); "
        "short epochs never reach it, a long one loses at most this much to a kill",
    )
    add(
        "--resume",
        metavar="PATH",
        help="checkpoint to continue (e.g. checkpoints/<run>/last.pt); a run folder: its newest intact checkpoint; "
        "'auto': that of the run under --checkpoint_dir written last",
    )
    add("--device", default="auto", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    add(
        "--cache_dir",
        help="store spectrograms here once (float16, about 109 kB per 90 s file) and read them "
        "back each epoch instead of decoding miniSEED; off when not given",
    )
    add(
        "--amp",
        choices=("off", "auto", "bf16", "fp16"),
        default="off",
        help="mixed precision: 'auto' is bf16 where supported, else fp16 (with a gradient scaler)",
    )
    add("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    args = parser.parse_args(argv)
    problems = argument_problems(args)
    if problems:
        parser.error("; ".join(problems))
    return parser, args


def argument_problems(args):
    """What is wrong with the flags, one phrase each; [] when nothing is."""
    rules = [
        ("batch_size", args.batch_size >= 1, ">= 1"),
        ("num_epochs", args.num_epochs >= 1, ">= 1"),
        ("lr", args.lr > 0, "> 0"),
        ("num_workers", args.num_workers >= 0, ">= 0"),
        ("val_split", 0 < args.val_split < 1, "between 0 and 1"),
        ("save_every", args.save_every >= 1, ">= 1"),
        ("keep_checkpoints", args.keep_checkpoints >= 0, ">= 0"),
        ("save_every_steps", args.save_every_steps >= 0, ">= 0"),
        ("save_every_minutes", args.save_every_minutes >= 0, ">= 0"),
        ("weight_decay", args.weight_decay >= 0, ">= 0"),
        ("spectral_tilt", args.spectral_tilt >= 0, ">= 0"),
        ("noise_floor", 0 <= args.noise_floor < 1, "in [0, 1)"),
        ("horizontal_swap", 0 <= args.horizontal_swap <= 1, "in [0, 1]"),
        ("offset_bins", args.offset_bins >= 0, ">= 0"),
        ("offset_bins", not args.offset_bins or args.crop_bins == [0, 0], "0 with --crop_bins (crops vary the length)"),
        (
            "crop_bins",
            args.crop_bins == [0, 0] or 1 <= args.crop_bins[0] <= args.crop_bins[1],
            "0 0 or 1 <= MIN <= MAX",
        ),
    ]
    problems = [f"--{name} must be {rule}" for name, ok, rule in rules if not ok]
    try:
        problems += window_problems(args.window_seconds, args.window_stride, stft_config(args))
    except ValueError as err:
        problems.append(str(err))
    return problems


def stft_config(args):
    return STFTConfig(nperseg=args.nperseg, noverlap=args.noverlap, nfft=args.nfft)


def resume_settings(parser, args, checkpoint):
    """Take the run-defining settings from the checkpoint; warn where the command line differs."""
    saved = checkpoint["args"]
    for key in RUN_KEYS:
        given = getattr(args, key)
        kept = saved.get(key, BEFORE_FLAG.get(key))
        if given != parser.get_default(key) and given != kept:
            log.warning("--%s %s ignored: a resumed run keeps its checkpoint's value %s", key, given, kept)
        setattr(args, key, kept)
    if args.data_dir == parser.get_default("data_dir"):
        args.data_dir = saved["data_dir"]  # a different --data_dir is honoured: the data may have moved


def split_files(files, val_split, seed):
    """Reproducible train/validation split of relative paths: (train, val), both sorted (--split_by file)."""
    keys = np.array(sorted(files), dtype=str)
    val = set(choose_val_groups(keys, np.arange(len(keys)), val_split, seed))
    return [f for f in files if f not in val], sorted(val)


def split_samples(dataset, args, checkpoint):
    """(train indices, validation indices, validation groups) of the dataset for --split_by.

    A new run draws the groups (recordings.choose_val_groups); a resumed one keeps its checkpoint's, and
    samples of groups added since go to training.
    """
    keys, codes = dataset.groups(args.split_by)
    if checkpoint:
        val_groups = checkpoint.get("val_groups", checkpoint["val_files"])
    else:
        val_groups = choose_val_groups(keys, codes, args.val_split, args.seed)
        if val_groups is None:
            raise RunError(
                f"--split_by {args.split_by}: {args.data_dir} has fewer than 2 {args.split_by} groups with usable "
                "samples; need one to train, one to validate (try --split_by file)"
            )
    is_val = in_groups(keys, codes, val_groups)
    return np.flatnonzero(~is_val & (codes >= 0)), np.flatnonzero(is_val), val_groups


def new_run_name(checkpoint_dir):
    name = datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while os.path.exists(os.path.join(checkpoint_dir, name if suffix == 1 else f"{name}-{suffix}")):
        suffix += 1
    return name if suffix == 1 else f"{name}-{suffix}"


def load_dataset(args, stft, skips):
    """Rank 0 indexes (and caches) first; the other processes then find the index and cache stored."""
    if not is_rank_zero():
        dist.barrier()
    try:
        dataset = SeismicSTFTDataset(
            args.data_dir,
            args.channels,
            stft,
            args.extensions,
            skips=skips,
            cache_dir=args.cache_dir,
            window_seconds=args.window_seconds,
            window_stride=args.window_stride,
        )
    except OSError as err:  # a missing --data_dir; a --cache_dir that cannot be written (full, read-only)
        raise RunError(str(err)) from None
    if dist.is_initialized() and is_rank_zero():
        dist.barrier()
    if len(dataset) == 0 and skips.counts().get("shorter than --window_seconds"):
        raise RunError(
            f"--window_seconds {args.window_seconds:g} is longer than every usable recording in {args.data_dir} "
            "(see the warnings above)"
        )
    if len(dataset) < 2:
        raise RunError(
            f"{len(dataset)} usable {'windows' if args.window_seconds else 'files'} of families "
            f"{' '.join(args.channels)} in {args.data_dir} (skipped files: {skips.describe()}); "
            "need at least 2 (one to train, one to validate)"
        )
    return dataset


def plan_run(args, checkpoint, dataset):
    """Run name, run folder and split: new, or the checkpoint's (groups added since then go to training).

    Returns run name, run folder, train and validation sample indices, validation files, validation groups.
    """
    if checkpoint:
        run_name, run_dir = checkpoint["run_name"], os.path.dirname(os.path.abspath(args.resume))
    else:
        run_name = from_rank_zero(new_run_name(args.checkpoint_dir) if is_rank_zero() else None)
        run_dir = os.path.join(args.checkpoint_dir, run_name)
    train_indices, val_indices, val_groups = split_samples(dataset, args, checkpoint)
    val_files = set(dataset.files[dataset.sample_recording[val_indices]].tolist())
    if checkpoint:
        val_files |= set(checkpoint["val_files"])  # files gone since stay on record
    val_files = sorted(val_files)
    if is_rank_zero():
        os.makedirs(run_dir, exist_ok=True)
        text = "".join(name + "\n" for name in val_files)
        atomic_write(os.path.join(run_dir, "val_files.txt"), lambda f: f.write(text.encode()))
    return run_name, run_dir, train_indices, val_indices, val_files, val_groups


def build_loaders(dataset, train_indices, val_indices, val_files, args, device):
    """(train loader, validation loader, train sampler): this process's share of each, in index arrays."""
    rank, world_size = rank_and_world_size()
    present = set(dataset.files.tolist())
    missing = [f for f in val_files if f not in present]
    if missing:
        log.warning("%d validation files of this run are no longer in %s", len(missing), args.data_dir)
    train_set = Subset(dataset, train_indices)
    # Each validation file exactly once over all processes (DistributedSampler would repeat files to even out).
    val_set = Subset(dataset, val_indices[rank::world_size])
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    common = loader_options(args.batch_size, args.num_workers, device)
    # Batches by index, so that a run resumed in the middle of an epoch leaves out those done (SkipFirst.skip).
    batches = SkipFirst(BatchSampler(sampler, common.pop("batch_size"), drop_last=False))
    train_loader = DataLoader(train_set, batch_sampler=batches, **common)
    return train_loader, DataLoader(val_set, batch_size=args.batch_size, **common), sampler


@dataclass
class Run:
    """What a training run holds from one epoch to the next."""

    args: argparse.Namespace
    device: torch.device
    stft: STFTConfig
    skips: SkipLog
    dataset: SeismicSTFTDataset
    name: str
    run_dir: str
    log_dir: str
    val_files: list  # relative paths; stored in every checkpoint
    val_groups: list  # what --split_by keeps on the validation side (files, stations, networks, days)
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: DistributedSampler
    model: ConvAutoencoder  # the plain model: its weights go into checkpoints
    forward: torch.nn.Module  # the model, compiled or not: validates
    trained: torch.nn.Module  # forward, wrapped in DDP under torchrun: trains
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object  # context factory
    state: dict  # epoch, global_step, best_val_loss, best_epoch, history (checkpoints.RUN_STATE_KEYS)
    config: dict  # written to config.json
    writer: SummaryWriter | None  # rank 0 only
    image_batch: dict | None  # the fixed validation samples drawn to TensorBoard; rank 0 only


def prepare(args, checkpoint, device):
    """Data, split, loaders, model, optimizer and TensorBoard writer of a new or resumed run."""
    rank, world_size = rank_and_world_size()
    stft, skips = stft_config(args), SkipLog()
    dataset = load_dataset(args, stft, skips)
    run_name, run_dir, train_indices, val_indices, val_files, val_groups = plan_run(args, checkpoint, dataset)
    train_loader, val_loader, sampler = build_loaders(dataset, train_indices, val_indices, val_files, args, device)

    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = ConvAutoencoder(ModelConfig(features=ARCHS[args.arch], size_fit=args.size_fit)).to(
        device, memory_format=torch.channels_last
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    autocast, scaler, amp = mixed_precision(args.amp, device)
    state = restore(checkpoint, model, optimizer, scaler)
    if rank == 0:  # a folder that cannot take a checkpoint (weights and Adam's two moments) stops the run now
        probe_writable(run_dir, 3 * sum(p.numel() * p.element_size() for p in model.parameters()))
    if checkpoint:
        log.info("resuming run %s after %s", checkpoint["run_name"], describe_position(state))
    forward, trained = wrap_for_training(model, args.compile, device)
    log_dir = os.path.join(args.log_dir, run_name)
    purge_step = state["global_step"] + 1 if checkpoint else None
    writer = SummaryWriter(log_dir, purge_step=purge_step) if rank == 0 else None

    config = run_config(args, run_name, stft, model, device, amp, dataset, train_indices, val_indices)
    log.info(
        "run %s: %d train / %d validation samples (split by %s), device %s x %d, %d parameters, amp %s",
        *(run_name, len(train_indices), len(val_indices), args.split_by, device, world_size),
        *(config["num_parameters"], amp),
    )
    image_batch = pad_collate([dataset[i] for i in val_indices[:NUM_IMAGES]]) if rank == 0 else None
    return Run(
        args=args,
        device=device,
        stft=stft,
        skips=skips,
        dataset=dataset,
        name=run_name,
        run_dir=run_dir,
        log_dir=log_dir,
        val_files=val_files,
        val_groups=val_groups,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        model=model,
        forward=forward,
        trained=trained,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast,
        state=state,
        config=config,
        writer=writer,
        image_batch=image_batch,
    )


def run_config(args, run_name, stft, model, device, amp, dataset, train_indices, val_indices):
    """What config.json records: every setting, the dataset's sizes and the package versions.

    usable_files, train_files, val_files count samples (files, or windows with --window_seconds).
    """
    sizes = {"usable_files": len(dataset), "train_files": len(train_indices), "val_files": len(val_indices)}
    return {
        "run_name": run_name,
        "args": vars(args),
        "stft_config": asdict(stft),
        "model_config": model.config.to_dict(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "processes": rank_and_world_size()[1],
        "amp": amp,
        "versions": package_versions(),
        "dataset": {**sizes, "excluded_by_family": dict(dataset.excluded)},
    }


def train(args, checkpoint, device):
    """Prepare, then per epoch: train, validate, record, save. Returns the run's summary dict.

    SIGTERM or SIGUSR1 (preemption.StopSignals): the step in progress finishes, last.pt is written where the run
    stands and the process exits with 128 + the signal number. Ctrl-C exits with 130 and saves nothing.
    """
    try:
        run = prepare(args, checkpoint, device)
    except OSError as err:  # the run's folders cannot be made or written: nothing was trained yet
        raise RunError(f"{err}; nothing was trained; free space or choose another --checkpoint_dir/--log_dir") from None
    try:
        with logging_redirect_tqdm(), StopSignals() as signals:
            check = StepCheck(signals, args.save_every_steps, args.save_every_minutes)
            for epoch in range(run.state["epoch"] + 1, args.num_epochs + 1):
                train_loss, step_losses, samples_per_s = train_one_epoch(run, epoch, check)
                val_loss = validate(run)
                improved = record(run, epoch, train_loss, val_loss, step_losses, samples_per_s)
                if is_rank_zero():
                    save(run, epoch, improved)
                check.saved()
                signum = check.stop_signal()
                if signum:  # received during validation or the save: last.pt is this epoch's
                    raise Preempted(signum)
    except KeyboardInterrupt:
        stop(run, "interrupted")
        sys.exit(130)
    except Preempted as signal_received:
        stop(run, f"stopped by {signal_received} after {describe_position(run.state)}; last.pt saved")
        sys.exit(signal_received.exit_code)
    except OSError as err:  # disk full, quota, read-only: a checkpoint, config.json or a TensorBoard event file
        path, _ = newest_intact(run.run_dir)
        advice = f"no intact checkpoint in {run.run_dir}"
        if path:
            advice = f"the newest intact checkpoint is {path}; once there is room: {resume_command(run, path)}"
        raise RunError(f"{err}; {advice}") from None
    if is_rank_zero():
        finish(run)
    return {**run.state, "run_dir": run.run_dir, "log_dir": run.log_dir, "skipped": run.skips.counts()}


def stop(run, what):
    """Close TensorBoard and print, in one line, why the run stops and how to continue it."""
    if run.writer:
        run.writer.close()
    log.warning("%s; continue with: %s", what, resume_command(run, os.path.join(run.run_dir, "last.pt")))


def resume_command(run, path):
    command = "the same torchrun command with" if dist.is_initialized() else "python train.py"
    return f"{command} --resume {path} --num_epochs {run.args.num_epochs}"


def describe_position(state):
    """'epoch 3' or 'step 5 of epoch 4': how far the run (or its checkpoint) has trained."""
    in_epoch = state["in_epoch"]
    return f"step {in_epoch['step']} of epoch {in_epoch['epoch']}" if in_epoch else f"epoch {state['epoch']}"


def train_one_epoch(run, epoch, check=None):
    """(mean training loss over all processes, rank 0's per-step losses, samples/s of all processes).

    A run resumed from a save in this epoch starts after the batches it had done, with their sums and step losses.
    """
    rank = rank_and_world_size()[0]
    torch.manual_seed(epoch_seed(run.args.seed, epoch, rank))  # DataLoader worker seeds
    run.sampler.set_epoch(epoch)  # the same order whether or not the run was resumed
    done = run.state["in_epoch"] if run.state["in_epoch"] and run.state["in_epoch"]["epoch"] == epoch else None
    start_step = done["step"] if done else 0
    # The sums of the batches done before the save are all processes' together: added once, by rank 0.
    before = done["sums"] if done and rank == 0 else [0.0, 0, 0]
    losses_before = [torch.tensor(loss) for loss in done["step_losses"]] if done and rank == 0 else []
    run.train_loader.batch_sampler.skip = start_step
    started = time.perf_counter()
    loop = (run.trained, run.train_loader, run.optimizer, run.scaler, run.autocast, run.device, run.skips, epoch)

    def after_step(step, sums, step_losses):
        signum, due = check(step) if check else (0, False)
        if signum or (due and step < len(run.train_loader)):
            save_in_epoch(run, epoch, step, [a + b for a, b in zip(sums, before)], losses_before + step_losses)
            check.saved()
        if signum:
            raise Preempted(signum)

    sums, step_losses = train_epoch(
        *loop,
        dist.is_initialized(),
        augmentation(run.args, epoch),
        learning_rate(run.args, epoch, len(run.train_loader)),
        start_step,
        after_step,
    )
    run.state["in_epoch"] = None
    total, bins, samples = sum_over_processes([a + b for a, b in zip(sums, before)], run.device)
    share_batchnorm_statistics(run.model)
    samples_now = samples - sum_over_processes([before[2]], run.device)[0]
    return mean_loss(total, bins), losses_before + step_losses, samples_now / (time.perf_counter() - started)


def save_in_epoch(run, epoch, step, sums, step_losses):
    """last.pt with the position in the epoch (every process takes part in the sums; rank 0 writes)."""
    total, bins, samples = sum_over_processes(sums, run.device)
    if is_rank_zero():
        run.state["in_epoch"] = {
            "epoch": epoch,
            "step": step,
            "sums": [total, int(bins), int(samples)],
            "step_losses": torch.stack(step_losses).tolist() if step_losses else [],
        }
        write_run_record(run)
        save_checkpoint(run_checkpoint(run), os.path.join(run.run_dir, "last.pt"))
        log.info("saved last.pt at step %d of epoch %d", step, epoch)
    if dist.is_initialized():
        dist.barrier()  # no process exits (torchrun would end the others) before rank 0 has written last.pt


def augmentation(args, epoch):
    """The epoch's augmentation of training batches (augment.py: a crop or an offset, the spectral tilt, the noise
    floor, the horizontal swap), or None when all are off."""
    min_bins, max_bins = args.crop_bins
    if not any((min_bins, args.offset_bins, args.spectral_tilt, args.noise_floor, args.horizontal_swap)):
        return None
    rank = rank_and_world_size()[0]
    freqs, _ = stft_config(args).axes(0)

    def augment(x, mask, step):
        rng = batch_rng(args.seed, epoch, rank, step)
        if min_bins:
            x, mask = random_time_crop(x, mask, rng, min_bins, max_bins)
        elif args.offset_bins:
            x, mask = random_time_offset(x, mask, rng, args.offset_bins)
        if args.spectral_tilt:
            x, mask = random_spectral_tilt(x, mask, rng, args.spectral_tilt, freqs)
        if args.noise_floor:
            x, mask = random_noise_floor(x, mask, rng, args.noise_floor)
        if args.horizontal_swap:
            x, mask = random_horizontal_swap(x, mask, rng, args.horizontal_swap)
        return x, mask

    return augment


def learning_rate(args, epoch, steps_per_epoch):
    """step in the epoch -> learning rate, or None for a constant --lr."""
    if args.lr_schedule == "constant":
        return None
    total = args.num_epochs * steps_per_epoch
    return lambda step: args.lr * one_cycle(((epoch - 1) * steps_per_epoch + step) / total)


def validate(run):
    """Mean validation loss over all processes; every process then knows every skipped file."""
    sums = evaluate(run.forward, run.val_loader, run.autocast, run.device, run.skips)
    total, bins = sum_over_processes(sums, run.device)
    gather_skips(run.skips)
    if not bins:  # every process sees the same sums: all stop together, none waits at a collective
        raise RunError(
            f"none of the {len(run.val_files)} validation files could be read (see the warnings above); "
            "a run needs at least one usable validation file"
        )
    return mean_loss(total, bins)


def record(run, epoch, train_loss, val_loss, step_losses, samples_per_s):
    """Update the run state, log the epoch and (rank 0) write TensorBoard; True when val_loss is the best so far."""
    state = run.state
    improved = val_loss < state["best_val_loss"]
    if improved:
        state["best_val_loss"], state["best_epoch"] = val_loss, epoch
    state["epoch"] = epoch
    state["history"].append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
    log.info(
        "epoch %d/%d  train %.5f  val %.5f  %.0f samples/s%s",
        epoch,
        run.args.num_epochs,
        train_loss,
        val_loss,
        samples_per_s,
        "  (best)" if improved else "",
    )
    first_step = state["global_step"] + 1
    state["global_step"] += len(step_losses)
    if run.writer:
        write_epoch_scalars(
            run.writer, epoch, first_step, step_losses, train_loss, val_loss, run.optimizer, samples_per_s
        )
        if run.image_batch["spectrogram"] is not None:
            log_images(run.model, run.image_batch, run.device, run.writer, epoch)
    return improved


def save(run, epoch, improved):
    """config.json, skipped_files.json, then the epoch's checkpoints (rank 0)."""
    write_run_record(run)
    save_epoch_checkpoints(
        run_checkpoint(run), run.run_dir, epoch, improved, run.args.save_every, run.args.keep_checkpoints
    )
    run.writer.flush()


def run_checkpoint(run):
    """The checkpoint of where the run stands (checkpoints.checkpoint_dict)."""
    return checkpoint_dict(
        run.state,
        run.model,
        run.optimizer,
        run.scaler,
        run.stft,
        vars(run.args),
        run.name,
        run.val_files,
        run.val_groups,
    )


def write_run_record(run):
    """config.json (settings, dataset sizes, skip counts) and skipped_files.json (every skip and its reason)."""
    run.config["skipped"] = run.skips.counts()
    write_json_atomic(os.path.join(run.run_dir, "config.json"), run.config)
    write_json_atomic(os.path.join(run.run_dir, "skipped_files.json"), run.skips.summary())


def finish(run):
    """The end of a run (rank 0): hparams, the last records, and the report."""
    log_hparams(run.writer, run.args, run.state)
    run.writer.close()
    write_run_record(run)
    report(run.state, run.run_dir, run.log_dir, run.skips, run.dataset)


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


def main(argv=None):
    """Train; returns a summary dict (best_val_loss, best_epoch, run_dir, log_dir, history, skipped)."""
    parser, args = parse_args(argv)
    try:
        args.resume, checkpoint = resume_point(args.resume, args.checkpoint_dir) if args.resume else (None, None)
        rank, _, device = init_distributed(args.device)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    # Other processes report errors only; rank 0 merges their skipped files into its own report.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.ERROR,
        force=True,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if checkpoint:
            resume_settings(parser, args, checkpoint)
        return train(args, checkpoint, device)
    except RunError as err:
        parser.exit(2, f"error: {err}\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
