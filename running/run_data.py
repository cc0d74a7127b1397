"""The data of a training run: the dataset (rank 0 indexes first under torchrun), its split into training and
validation samples by --split_by (new, or the checkpoint's), the run's name and folder, and this process's loaders."""

import logging
import os
from datetime import datetime

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset

from reading.recordings import choose_val_groups, in_groups
from running.device import loader_options
from running.distributed import from_rank_zero, is_rank_zero, rank_and_world_size, rank_zero_first
from running.positives import PairSampler, folder_codes
from running.preemption import SkipFirst
from running.settings import RunError
from running.storage import atomic_write
from stft_dataset import SeismicSTFTDataset

log = logging.getLogger("train")


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
    try:
        with rank_zero_first():
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
    """Run name, run folder and split: new, or the checkpoint's (groups added since then go to training); nothing is
    written (record_split writes the folder).

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
    return run_name, run_dir, train_indices, val_indices, sorted(val_files), val_groups


def record_split(run_dir, val_files):
    """The run folder and its val_files.txt (rank 0): written once the run is known to start, so that a run refused
    while it is prepared leaves no folder behind."""
    if is_rank_zero():
        os.makedirs(run_dir, exist_ok=True)
        text = "".join(name + "\n" for name in val_files)
        atomic_write(os.path.join(run_dir, "val_files.txt"), lambda f: f.write(text.encode()))


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
    if args.positive_weight:  # batches of pairs of one event folder (running/positives.py)
        sampler = pair_sampler(dataset, train_indices, args, world_size, rank)
    common = loader_options(args.batch_size, args.num_workers, device)
    # Batches by index, so that a run resumed in the middle of an epoch leaves out those done (SkipFirst.skip).
    batches = SkipFirst(BatchSampler(sampler, common.pop("batch_size"), drop_last=False))
    train_loader = DataLoader(train_set, batch_sampler=batches, **common)
    return train_loader, DataLoader(val_set, batch_size=args.batch_size, **common), sampler


def pair_sampler(dataset, train_indices, args, world_size, rank):
    """PairSampler of the training samples by folder; a folder holding every sample would make all of them positives
    of each other (the embedding would collapse to one point), so it stops the run."""
    codes = folder_codes(dataset.files[dataset.sample_recording[train_indices]])
    counts = np.bincount(codes)
    if len(counts) < 2:
        raise RunError(
            f"--positive_weight pairs the recordings of one event folder, and all {len(codes)} training samples of "
            f"{args.data_dir} are in one folder; put each event's recordings in a folder of its own"
        )
    log.info(
        "positives: %d training samples in %d folders (%d with more than one recording, median %g per folder)",
        *(len(codes), len(counts), int((counts > 1).sum()), float(np.median(counts))),
    )
    return PairSampler(codes, world_size, rank, args.seed)
