"""Stopping a run where it can resume exactly: SIGTERM and SIGUSR1, saves in the middle of an epoch, and the
batches a resumed epoch skips.

SIGTERM is what SLURM, Kubernetes and `docker stop` send before they kill a job; SIGUSR1 is what SLURM's
`--signal=USR1@SECONDS` sends ahead of the time limit. Inside `StopSignals` either one only sets a flag. After each
training step `StepCheck` reads it, with whether a save is due, and under torchrun all processes all-reduce (max)
those two integers, so every process stops (or saves) after the same step. That is one all-reduce of two integers per
step, on a gloo group: on the CPU, so it never waits for the GPU.
"""

import signal
import threading
import time

import torch
import torch.distributed as dist

from running.distributed import is_rank_zero

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A stop signal was received; the run has saved where it stands. exit_code: 128 + the signal number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.exit_code = signum, 128 + signum


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGUSR1 set `received` (the signal number) instead of ending the
    process; the previous handlers come back on exit."""

    def __enter__(self):
        self.received, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():  # Python takes signals in the main thread only
            self.previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class StepCheck:
    """After a step: (signal to stop on or 0, whether to save now), the same on every process.

    A save is due every `every_steps` batches of an epoch (0: never), and when `every_minutes` (0: never) have passed
    on rank 0's clock since the last save.
    """

    def __init__(self, signals, every_steps, every_minutes):
        self.signals, self.every_steps, self.every_seconds = signals, every_steps, every_minutes * 60
        self.last_save = time.monotonic()
        self.group = None
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # every process creates it, in the same order

    def __call__(self, step):
        """step: batches of this epoch done."""
        due = bool(self.every_steps) and step % self.every_steps == 0
        if self.every_seconds and is_rank_zero():
            due = due or time.monotonic() - self.last_save >= self.every_seconds
        flags = torch.tensor([self.signals.received, int(due)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

    def saved(self):
        self.last_save = time.monotonic()

    def stop_signal(self):
        """The signal any process received (0: none), agreed by all; between epochs."""
        flag = torch.tensor([self.signals.received])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag[0])


class SkipFirst:
    """A batch sampler that leaves out the first `skip` batches of another's order: a resumed epoch starts where
    the saved one stopped. Works for any batch sampler whose order is a function of the seed and the epoch.

    len() is the whole epoch's, skipped batches included, so that step numbers and the learning-rate schedule stay
    those of the uninterrupted epoch.
    """

    def __init__(self, batches, skip=0):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        for step, batch in enumerate(self.batches):
            if step >= self.skip:
                yield batch

    def __len__(self):
        return len(self.batches)
