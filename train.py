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
epoch and exits with 143 or 138; --resume continues from that step exactly. docs/training.md explains the defaults.
"""

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.contrib.logging import logging_redirect_tqdm

from model import ARCHS, DEFAULT_ARCH, SIZE_FITS, ConvAutoencoder, ModelConfig
from reading.augment import augmentation
from reading.file_index import DEFAULT_DATA_DIR
from reading.recordings import SPLITS, window_problems
from reading.transform import NORMALISATIONS, STFTConfig
from reading.waveforms import DEFAULT_FAMILIES, MINISEED_EXTENSIONS
from running.checkpoints import (
    checkpoint_dict,
    newest_intact,
    restore,
    resume_point,
    resume_settings,
    save_checkpoint,
    save_epoch_checkpoints,
)
from running.device import AMP_MODES, mixed_precision, package_versions
from running.distributed import (
    epoch_seed,
    gather_skips,
    init_distributed,
    is_rank_zero,
    rank_and_world_size,
    share_batchnorm_statistics,
    sum_over_processes,
    wrap_for_training,
)
from running.positives import PairSampler
from running.preemption import Preempted, StepCheck, StopSignals
from running.run_data import build_loaders, load_dataset, plan_run, record_split
from running.run_records import log_hparams, log_images, report, write_epoch_scalars, write_run_record
from running.settings import POSITIVE, RunError, Setting, at_least, device_setting, parse, run_keys
from running.storage import probe_writable
from running.training import (
    BATCH_SIZE,
    CROP_BINS,
    HORIZONTAL_SWAP,
    LR,
    LR_SCHEDULE_HELP,
    NOISE_FLOOR,
    NUM_EPOCHS,
    OFFSET_BINS,
    SPECTRAL_TILT,
    SPLIT_BY,
    WEIGHT_DECAY,
    evaluate,
    learning_rate,
    mean_loss,
    nyquist_band,
    positives,
    store_readout,
    train_epoch,
)
from stft_dataset import SeismicSTFTDataset, SkipLog, pad_collate

log = logging.getLogger("train")
NUM_IMAGES = 4  # fixed validation samples drawn to TensorBoard each epoch
SAVE_EVERY_MINUTES = 10  # --save_every_minutes: what a kill without warning may cost a long epoch
STFT = STFTConfig()
ARCH_HELP = ", ".join(f"{name} ({' '.join(map(str, widths))})" for name, widths in ARCHS.items())
# Every setting of train.py, once; run=True: it defines the run, so --resume takes it from the checkpoint.
# fmt: off
SETTINGS = (
    Setting("data_dir", DEFAULT_DATA_DIR, "directory searched recursively for miniSEED files"),
    Setting("channels", list(DEFAULT_FAMILIES), "channel families (band + instrument) to use", nargs="+", run=True),
    Setting("extensions", list(MINISEED_EXTENSIONS), "file extensions taken as miniSEED", nargs="+", run=True),
    Setting("batch_size", BATCH_SIZE, "spectrograms per batch", int, check=at_least(1), run=True),
    Setting("num_epochs", NUM_EPOCHS, "total epochs (with --resume: those done included)", int, check=at_least(1)),
    Setting("lr", LR, "AdamW learning rate (--lr_schedule onecycle: the peak)", float, check=POSITIVE, run=True),
    Setting("lr_schedule", "onecycle", LR_SCHEDULE_HELP, choices=("onecycle", "constant"), run=True),
    Setting("weight_decay", WEIGHT_DECAY, "AdamW weight decay (0: Adam)", float, check=at_least(0), run=True),
    Setting("crop_bins", list(CROP_BINS), "train on random windows of MIN to MAX time bins (0 0: off)", int, nargs=2,
            metavar=("MIN", "MAX"), run=True),
    Setting("offset_bins", OFFSET_BINS, "drop 0 to MAX time bins at a random place (0: off)", int, check=at_least(0),
            metavar="MAX", run=True),
    Setting("spectral_tilt", SPECTRAL_TILT, "random instrument response f ** p, slope in [-MAX, MAX] (0: off)",
            float, check=at_least(0), metavar="MAX", run=True),
    Setting("noise_floor", NOISE_FLOOR, "random noise floor up to MAX of the log10 range (0: off)", float,
            check=(lambda value: 0 <= value < 1, "in [0, 1)"), metavar="MAX", run=True),
    Setting("horizontal_swap", HORIZONTAL_SWAP, "E and N exchanged with probability P (0: off)", float,
            check=(lambda value: 0 <= value <= 1, "in [0, 1]"), metavar="P", run=True),
    Setting("nyquist_band", False, "loss over each recording's bins below its own Nyquist frequency alone",
            action=argparse.BooleanOptionalAction, run=True),
    Setting("positive_weight", 0.0, "weight of a contrastive term pairing recordings of one folder, an event at "
            "several stations (0: off)", float, check=at_least(0), metavar="W", run=True),
    Setting("size_fit", ModelConfig.size_fit, "how a spectrogram meets the layers' stride", choices=SIZE_FITS,
            run=True),
    Setting("arch", DEFAULT_ARCH, f"encoder widths: {ARCH_HELP}", choices=list(ARCHS), run=True),
    Setting("num_workers", 2, "DataLoader worker processes (0 = load in the main process)", int, check=at_least(0)),
    Setting("val_split", 0.2, "fraction of samples held out for validation", float,
            check=(lambda value: 0 < value < 1, "between 0 and 1"), run=True),
    Setting("split_by", SPLIT_BY, "what the validation split keeps on one side", choices=SPLITS, run=True),
    Setting("window_seconds", None, "cut recordings into windows of this many seconds (default: one sample per file)",
            float, run=True),
    Setting("window_stride", None, "seconds from one window's start to the next (default: --window_seconds)", float,
            run=True),
    Setting("seed", 42, "seed of the split, the initial weights and the shuffling", int, run=True),
    Setting("nperseg", STFT.nperseg, "STFT window length in samples at 100 Hz", int, run=True),
    Setting("noverlap", STFT.noverlap, "STFT window overlap in samples", int, run=True),
    Setting("nfft", STFT.nfft, "STFT FFT length (nfft // 2 + 1 frequency bins)", int, run=True),
    Setting("normalisation", STFT.normalisation, "log10 |STFT| to [0, 1]: min-max, or each row over its median in dB",
            choices=tuple(NORMALISATIONS), run=True),
    Setting("checkpoint_dir", "checkpoints", "parent directory of the run's checkpoint folder"),
    Setting("log_dir", "logs", "parent directory of the run's TensorBoard folder", run=True),
    Setting("save_every", 5, "write checkpoint_epoch_N.pt every this many epochs", int, check=at_least(1)),
    Setting("keep_checkpoints", 3, "periodic checkpoints kept (0 keeps all)", int, check=at_least(0)),
    Setting("save_every_steps", 0, "also write last.pt every N batches of an epoch (0: off)", int, check=at_least(0)),
    Setting("save_every_minutes", SAVE_EVERY_MINUTES, "also write last.pt in an epoch every this many minutes (0: off)",
            float, check=at_least(0)),
    Setting("resume", None, "checkpoint to continue; a run folder: its newest intact one; 'auto': the latest run's",
            metavar="PATH"),
    device_setting(),
    Setting("cache_dir", None, "store spectrograms here once (float16) and read them back each epoch (default: off)"),
    Setting("amp", "off", "mixed precision: 'auto' is bf16 where supported, else fp16", choices=AMP_MODES),
    Setting("compile", False, "torch.compile the model", action=argparse.BooleanOptionalAction),
)
# fmt: on
RUN_KEYS = run_keys(SETTINGS)


def parse_args(argv=None):
    return parse(__doc__, SETTINGS, argv, argument_problems)


def argument_problems(args):
    """What is wrong with the flags beyond each one's own rule, one phrase each; [] when nothing is."""
    problems = []
    if args.offset_bins and args.crop_bins != [0, 0]:
        problems.append("--offset_bins must be 0 with --crop_bins (crops vary the length)")
    if args.positive_weight and args.batch_size % 2:
        problems.append("--positive_weight needs an even --batch_size (batches of pairs)")
    if args.crop_bins != [0, 0] and not 1 <= args.crop_bins[0] <= args.crop_bins[1]:
        problems.append("--crop_bins must be 0 0 or 1 <= MIN <= MAX")
    try:
        problems += window_problems(args.window_seconds, args.window_stride, stft_config(args))
    except ValueError as err:
        problems.append(str(err))
    return problems


def stft_config(args):
    return STFTConfig(nperseg=args.nperseg, noverlap=args.noverlap, nfft=args.nfft, normalisation=args.normalisation)


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
    sampler: DistributedSampler | PairSampler
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
    record_split(run_dir, val_files)

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
    if image_batch is not None:  # rows of each image below its own Nyquist frequency: the rest is drawn as no data
        image_batch["valid_bins"] = [stft.bins_below_nyquist(meta["native_rate"]) for meta in image_batch["meta"]]
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
        augmentation(run.args, epoch, rank, run.stft.axes(0)[0]),
        learning_rate(run.args, epoch, len(run.train_loader)),
        start_step,
        after_step,
        band=nyquist_band(run.args, run.stft),
        positives=positives(run.args, run.stft, run.model.config),
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


def validate(run):
    """Mean validation loss over all processes; every process then knows every skipped file."""
    sums = evaluate(run.forward, run.val_loader, run.autocast, run.device, run.skips, nyquist_band(run.args, run.stft))
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
    model_and_optimiser = (run.model, run.optimizer, run.scaler)
    return checkpoint_dict(
        run.state, *model_and_optimiser, run.stft, vars(run.args), run.name, run.val_files, run.val_groups
    )


def finish(run):
    """The end of a run (rank 0): the read-out into best_model.pt, hparams, the last records, and the report."""
    train_indices = np.sort(run.train_loader.dataset.indices)
    best = os.path.join(run.run_dir, "best_model.pt")
    store_readout(best, run.dataset, train_indices, run.stft, run.args, run.device)
    log_hparams(run.writer, run.args, run.state)
    run.writer.close()
    write_run_record(run)
    report(run.state, run.run_dir, run.log_dir, run.skips, run.dataset)


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
            defaults = {key: parser.get_default(key) for key in (*RUN_KEYS, "data_dir")}
            for ignored in resume_settings(args, checkpoint, RUN_KEYS, defaults):
                log.warning(ignored)
        return train(args, checkpoint, device)
    except RunError as err:
        parser.exit(2, f"error: {err}\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
