"""Fault injection: real short training runs on the shipped recordings, each hit by one fault a real machine has.

    python tests/faults.py                 # every fault (a few minutes on 2 CPU cores); prints the table
    python tests/faults.py --only sigterm truncated_last

Every run is `python train.py` in its own process (12 shipped files: 9 train, 3 validate; batch 4, so 3 steps an
epoch; 3 epochs; --device cpu --num_workers 0; crops of 40-142 bins, whose draws a resume must repeat, and the
one-cycle schedule), started here through
`--child`, which runs train.main with two hooks: after every step it writes "epoch step" to a progress file
(the parent reads it to send signals at a chosen step from outside), and it can send itself a signal in the middle of
a checkpoint write. Disk full is a real 25 MB tmpfs (`unshare -rm` + `mount -t tmpfs`) where the machine allows it,
else a simulated OSError(ENOSPC) once the run folder would pass 25 MB.

For each fault the table gives what the user sees (exit code and the line that says what happened), the steps lost
(steps the stopped process had trained minus those in the checkpoint a resume starts from) and whether the resumed
run's per-epoch training and validation losses equal those of an uninterrupted run.
"""

import argparse
import copy
import errno
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "data", "filtered_waveforms")
FILES_PER_FAMILY = 3  # of HH, HN, EH, BH: 12 files, 9 to train in batches of 4 (3 steps an epoch), 3 to validate
EPOCHS = 3
DISK_MB = 25  # the small file system of the disk-full fault: two checkpoints fit, a third does not
# --split_by file: a quarter of the files validate whatever their stations, so every run has 3 steps an epoch
TRAIN = ["--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--val_split", "0.25", "--split_by", "file"]
TRAIN += ["--crop_bins", "40", "142"]  # not the default: crops are drawn per batch, and a resume must draw them again
RNG = random.Random(11)  # the "random" steps, the same every time the script runs


# ----------------------------------------------------------------------------- the child: train.main with hooks


def child(plan, argv):
    """train.main(argv) that reports each step to plan["progress"] and may signal itself inside a checkpoint write."""
    sys.path.insert(0, ROOT)
    import train
    from running import checkpoints

    original_epoch, original_write = train.train_epoch, checkpoints.atomic_write

    def train_epoch(*args, **kwargs):
        epoch, after = args[7], args[-1]

        def after_step(step, sums, losses):
            try:
                after(step, sums, losses)  # the step's save if one is due; a stop signal raises after it
            finally:
                with open(plan["progress"], "a") as f:
                    f.write(f"{epoch} {step}\n")

        return original_epoch(*args[:-1], after_step, **kwargs)

    writes = []

    def atomic_write(path, write):
        writes.append(os.path.basename(path))
        if plan.get("signal_in_write") == [os.path.basename(path), writes.count(os.path.basename(path))]:
            signum = plan["signal"]

            def half_then_signal(f):
                buffer = bytearray()

                class Sink:
                    def write(self, data):
                        buffer.extend(data)

                write(Sink())
                f.write(buffer[: len(buffer) // 2])
                f.flush()
                os.kill(os.getpid(), signum)  # SIGKILL ends here; SIGTERM only sets the flag
                f.write(buffer[len(buffer) // 2 :])

            return original_write(path, half_then_signal)
        return original_write(path, write)

    if plan.get("enospc_mb"):  # the simulated disk full, where no tmpfs can be mounted: this process only
        real_fsync = os.fsync

        def fsync(fd):
            folder = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
            used = sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())
            if used > plan["enospc_mb"] * 2**20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        os.fsync = fsync
    train.train_epoch, checkpoints.atomic_write = train_epoch, atomic_write
    train.main(argv)


# ----------------------------------------------------------------------------- the parent: runs, faults, table


class Lab:
    """A temporary folder with the data, and the runs made in it."""

    def __init__(self, base, files_per_family=FILES_PER_FAMILY, epochs=EPOCHS):
        self.base, self.epochs = base, epochs
        self.data = os.path.join(base, "data")
        os.makedirs(self.data, exist_ok=True)
        names = sorted(os.listdir(SHIPPED))
        for family in ("HH", "HN", "EH", "BH"):
            for name in [n for n in names if n.split(".")[2] == family][:files_per_family]:
                shutil.copy(os.path.join(SHIPPED, name), self.data)
        n_files = len(os.listdir(self.data))
        self.train_files = n_files - round(n_files * 0.25)  # --val_split 0.25
        self.steps = math.ceil(self.train_files / 4)  # --batch_size 4
        self.reference, self.reference_name = None, "reference"
        self.wrap = None  # command -> command: how every child of this lab is started (torchrun, a namespace)

    def flags(self, name, *extra):
        return [
            *("--data_dir", self.data, "--checkpoint_dir", os.path.join(self.base, name, "checkpoints")),
            *("--log_dir", os.path.join(self.base, name, "logs"), "--num_epochs", str(self.epochs), *TRAIN, *extra),
        ]

    def start(self, argv, plan=None, wrap=None):
        """Popen of a child run; returns (process, progress file, stderr file)."""
        progress = tempfile.mkstemp(prefix="progress", suffix=".txt", dir=self.base)[1]
        log = tempfile.mkstemp(prefix="stderr", suffix=".txt", dir=self.base)[1]
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            json.dumps({**(plan or {}), "progress": progress}),
        ]
        command = [*command, "--", *argv]
        wrap = wrap or self.wrap
        if wrap:
            command = wrap(command)
        with open(log, "w") as err:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        return process, progress, log

    def run(self, argv, plan=None, wrap=None, signal_at=None, signum=None, action=None):
        """Run a child to its end; at global step `signal_at` send `signum` or call `action()`. Returns Outcome."""
        process, progress, log = self.start(argv, plan, wrap)
        while process.poll() is None:
            if signal_at is not None and steps_done(progress, self.steps) >= signal_at:
                if signum:
                    process.send_signal(signum)
                if action:
                    action()
                signal_at = None
            time.sleep(0.02)
        return Outcome(process.returncode, steps_done(progress, self.steps), read(log))

    def uninterrupted(self):
        if self.reference is None:
            outcome = self.run(self.flags(self.reference_name))
            assert outcome.code == 0, outcome.stderr
            self.reference = history(last_checkpoint(os.path.join(self.base, self.reference_name, "checkpoints")))
        return self.reference

    def resume(self, name, resume, *extra):
        """Resume `name`'s run from `resume`; (steps in the checkpoint it starts from, compare with the reference)."""
        outcome = self.run(self.flags(name, "--resume", resume, *extra))
        if outcome.code != 0:
            return None, f"resume failed ({outcome.code}): {outcome.seen()}"
        run_dir = only_run(os.path.join(self.base, name, "checkpoints"))
        return started_from(outcome.stderr, self.steps), compare(
            self.uninterrupted(), history(load(run_dir, "last.pt"))
        )


class Outcome:
    def __init__(self, code, steps, stderr):
        self.code, self.steps, self.stderr = code, steps, stderr

    def seen(self):
        """The exit code and the line that tells the user what happened."""
        if self.code == -signal.SIGKILL:
            return "killed (exit -9): nothing can be printed"
        lines = [line for line in self.stderr.splitlines() if re.search(r"error:|stopped by|skipping|damaged", line)]
        line = lines[-1] if lines else "(no message)"
        line = re.sub(r"^\S+ (INFO|WARNING|ERROR) ", "", line)
        return f"exit {self.code}: {shorten(line)}"


def shorten(text):
    text = re.sub(r"/\S*/checkpoints/[\w-]+/", "<run>/", text)
    text = re.sub(r"/\S*/mnt_\w+/[\w-]+/", "<run>/", text)
    text = re.sub(r"/\S*/(data|vanish_data)/", "", text)
    text = re.sub(r"/\S*/cache/", "<cache_dir>/", text)
    return re.sub(
        r"continue with: python train.py --resume (\S+) --num_epochs \d+", r"continue with: --resume \1", text
    )


def read(path):
    with open(path) as f:
        return f.read()


def steps_done(progress, steps):
    """Global steps the run has finished, from its progress file."""
    if not os.path.exists(progress):
        return 0
    lines = read(progress).split()
    return (int(lines[-2]) - 1) * steps + int(lines[-1]) if lines else 0


def started_from(stderr, steps):
    """Global step of the checkpoint a resumed run started from, from its 'resuming run ... after ...' line."""
    found = re.search(r"resuming run \S+ after (?:step (\d+) of epoch (\d+)|epoch (\d+))", stderr)
    step, epoch, whole = found.groups()
    return int(whole) * steps if whole else (int(epoch) - 1) * steps + int(step)


def load(run_dir, name):
    return torch.load(os.path.join(run_dir, name), weights_only=True)


def only_run(checkpoint_dir):
    (name,) = os.listdir(checkpoint_dir)
    return os.path.join(checkpoint_dir, name)


def last_checkpoint(checkpoint_dir):
    return load(only_run(checkpoint_dir), "last.pt")


def history(checkpoint):
    return [(h["train_loss"], h["val_loss"]) for h in checkpoint["history"]]


def compare(reference, resumed):
    if len(reference) != len(resumed):
        return f"no: {len(resumed)} of {len(reference)} epochs"
    diff = max(abs(a - b) / abs(a) for pair_a, pair_b in zip(reference, resumed) for a, b in zip(pair_a, pair_b))
    return f"yes (max rel. diff {diff:.0e})" if diff <= 1e-6 else f"no (max rel. diff {diff:.1e})"


def row(fault, outcome, lost, exact):
    return {"fault": fault, "seen": outcome.seen(), "lost": lost, "exact": exact}


# ----------------------------------------------------------------------------- the faults


def signal_at_random_step(lab, name, signum, *extra):
    """A signal from outside when the run has done a random number of steps (never at an epoch's end)."""
    at = RNG.choice([s for s in range(2, EPOCHS * lab.steps) if s % lab.steps])
    outcome = lab.run(lab.flags(name, *extra), signal_at=at, signum=signum)
    start, exact = lab.resume(name, "auto", *extra)
    label = f"{signal.Signals(signum).name} sent after step {at} of {EPOCHS * lab.steps}" + (
        f" ({' '.join(extra)})" if extra else ""
    )
    return row(label, outcome, lost(outcome, start), exact)


def lost(outcome, start):
    return "-" if start is None else str(outcome.steps - start)


def sigterm(lab):
    return signal_at_random_step(lab, "sigterm", signal.SIGTERM)


def sigusr1(lab):
    return signal_at_random_step(lab, "sigusr1", signal.SIGUSR1)


def sigterm_workers(lab):
    return signal_at_random_step(lab, "sigterm_workers", signal.SIGTERM, "--num_workers", "2")


def sigterm_in_save(lab):
    """SIGTERM while last.pt of epoch 1 is half written."""
    plan = {"signal_in_write": ["last.pt", 1], "signal": signal.SIGTERM}
    outcome = lab.run(lab.flags("sigterm_in_save"), plan=plan)
    start, exact = lab.resume("sigterm_in_save", "auto")
    return row("SIGTERM while last.pt is being written", outcome, lost(outcome, start), exact)


def kill_in_save(lab):
    """kill -9 while last.pt of epoch 2 is half written: the previous last.pt must stay intact."""
    plan = {"signal_in_write": ["last.pt", 2], "signal": signal.SIGKILL}
    outcome = lab.run(lab.flags("kill_in_save"), plan=plan)
    start, exact = lab.resume("kill_in_save", "auto")
    return row("kill -9 while epoch 2's last.pt is being written (--resume auto)", outcome, lost(outcome, start), exact)


def torchrun_sigterm(lab):
    """SIGTERM to torchrun, which passes it to its 2 processes (gloo on the CPU): all must stop after the same step."""
    ddp = copy.copy(lab)
    ddp.reference, ddp.reference_name = None, "torchrun_reference"
    ddp.steps = math.ceil(math.ceil(lab.train_files / 2) / 4)  # each process trains on half the files
    ddp.wrap = lambda command: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                "2", *command[1:]]  # fmt: skip
    at = RNG.choice([s for s in range(2, EPOCHS * ddp.steps) if s % ddp.steps])
    outcome = ddp.run(ddp.flags("torchrun"), signal_at=at, signum=signal.SIGTERM)
    start, exact = ddp.resume("torchrun", "auto")
    label = f"SIGTERM sent to torchrun (2 processes) after step {at} of {EPOCHS * ddp.steps}"
    return row(label, outcome, lost(outcome, start), exact)


def kill_mid_epoch(lab, name, *extra):
    at = RNG.choice([s for s in range(lab.steps + 2, EPOCHS * lab.steps) if s % lab.steps])
    outcome = lab.run(lab.flags(name, *extra), signal_at=at, signum=signal.SIGKILL)
    start, exact = lab.resume(name, "auto", *extra)
    label = f"kill -9 after step {at} of {EPOCHS * lab.steps}" + (
        f" ({' '.join(extra)})" if extra else " (no saves within epochs)"
    )
    return row(label, outcome, lost(outcome, start), exact)


def kill_default(lab):
    return kill_mid_epoch(lab, "kill_default")


def kill_save_every(lab):
    return kill_mid_epoch(lab, "kill_save_every", "--save_every_steps", "2")


def on_tmpfs(mount, size_mb, copy_to=None):
    """command -> the command run in its own mount namespace with a size_mb tmpfs at mount; what the run left
    there is copied to copy_to (the tmpfs goes with the namespace)."""

    def wrap(command):
        script = f"mount -t tmpfs -o size={size_mb}m tmpfs {mount} && {shlex.join(command)}; code=$?; "
        if copy_to:
            script += f"mkdir -p {copy_to} && cp -a {mount}/. {copy_to}/; "
        return ["unshare", "-rm", "sh", "-c", script + "exit $code"]

    return wrap


def small_disk(lab, name, size_mb, copy_to=None):
    """Run `name` with its checkpoint folder on a size_mb file system: (outcome, how it was made)."""
    mount = os.path.join(lab.base, f"mnt_{name}")
    os.makedirs(mount, exist_ok=True)
    argv = [*lab.flags(name), "--checkpoint_dir", mount]
    if can_mount_tmpfs(mount):
        return lab.run(argv, wrap=on_tmpfs(mount, size_mb, copy_to)), f"a {size_mb} MB tmpfs"
    outcome = lab.run(argv, plan={"enospc_mb": size_mb})
    if copy_to:
        shutil.copytree(mount, copy_to)
    return outcome, f"{size_mb} MB, simulated ENOSPC"


def disk_full(lab):
    """The checkpoint folder on a 25 MB file system: two checkpoints fit, the third write fails."""
    copy = os.path.join(lab.base, "disk_full", "checkpoints")
    outcome, how = small_disk(lab, "disk_full", DISK_MB, copy)
    found = re.search(r"--resume (\S+)", outcome.stderr.splitlines()[-1] if outcome.stderr else "")
    resume = os.path.join(only_run(copy), os.path.basename(found.group(1))) if found else "auto"
    start, exact = lab.resume("disk_full", resume)
    return row(f"disk full ({how})", outcome, lost(outcome, start), exact)


def full_before_start(lab):
    """A checkpoint folder with less room than one checkpoint: found by the write probe, before any training."""
    outcome, how = small_disk(lab, "full_before_start", 4)
    return row(f"checkpoint folder too small ({how})", outcome, str(outcome.steps), "-")


def damaged_checkpoint(lab, name, damage, label):
    """A run stopped by SIGTERM in epoch 3 (last.pt mid-epoch; checkpoint_epoch_2.pt whole), then last.pt damaged:
    --resume last.pt must name the newest intact checkpoint; --resume <folder> picks it."""
    extra = ("--save_every", "1")
    if not hasattr(lab, "stopped"):  # one stopped run, copied for each kind of damage
        lab.stopped = lab.run(lab.flags("stopped", *extra), signal_at=2 * lab.steps + 1, signum=signal.SIGTERM)
    shutil.copytree(os.path.join(lab.base, "stopped"), os.path.join(lab.base, name))
    run_dir = only_run(os.path.join(lab.base, name, "checkpoints"))
    damage(os.path.join(run_dir, "last.pt"))
    refused = lab.run(lab.flags(name, "--resume", os.path.join(run_dir, "last.pt"), *extra))
    start, exact = lab.resume(name, run_dir, *extra)
    return row(label, refused, lost(lab.stopped, start), exact)


def truncated_last(lab):
    return damaged_checkpoint(lab, "truncated", lambda path: os.truncate(path, os.path.getsize(path) // 3),
                              "last.pt truncated to a third")  # fmt: skip


def empty_last(lab):
    return damaged_checkpoint(lab, "empty", lambda path: os.truncate(path, 0), "last.pt zero-length")


def foreign_last(lab):
    return damaged_checkpoint(lab, "foreign", lambda path: torch.save({"state_dict": {}}, path),
                              "last.pt replaced by another project's checkpoint")  # fmt: skip


def files_vanish(lab):
    """During epoch 1 two training files are removed and one is cut to half: skipped with their reasons."""
    data = os.path.join(lab.base, "vanish_data")
    shutil.copytree(lab.data, data)
    names = sorted(n for n in os.listdir(data) if n.endswith(".mseed"))

    def damage():
        for name in names[:2]:
            os.remove(os.path.join(data, name))
        path = os.path.join(data, names[2])
        os.truncate(path, os.path.getsize(path) // 2 + 1000)  # within a record: cut at a record's end, it is shorter

    argv = [*lab.flags("vanish"), "--data_dir", data]
    outcome = lab.run(argv, signal_at=1, action=damage)
    reasons = sorted(set(re.findall(r"skipping \S+: ([a-z0-9 ]+):", outcome.stderr)))
    finished = "finished" if outcome.code == 0 else f"failed ({outcome.code})"
    first_skip = next((line.split(" WARNING ")[-1] for line in outcome.stderr.splitlines() if "skipping" in line), "")
    return {
        "fault": "2 files removed, 1 cut within a record during epoch 1",
        "seen": f"exit {outcome.code}: {shorten(first_skip)}",
        "lost": "0",
        "exact": f"{finished}; skipped: {', '.join(reasons) or 'none'}",
    }


def damaged_cache(lab):
    """A run with --cache_dir, its shard then cut to half, the run again: the shard's files are computed again."""
    cache = os.path.join(lab.base, "cache")
    first = lab.run(lab.flags("cache_a", "--cache_dir", cache))
    folder = next(os.path.join(cache, d) for d in os.listdir(cache))
    shard = os.path.join(folder, "shard_0.f16")
    os.truncate(shard, os.path.getsize(shard) // 2)
    again = lab.run(lab.flags("cache_b", "--cache_dir", cache))
    same = compare(history(last_checkpoint(os.path.join(lab.base, "cache_a", "checkpoints"))),
                   history(last_checkpoint(os.path.join(lab.base, "cache_b", "checkpoints"))))  # fmt: skip
    assert first.code == 0, first.stderr
    return row("cache shard cut to half between runs", again, "0", f"losses as with the intact cache: {same}")


def can_mount_tmpfs(mount):
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"], capture_output=True
    )
    return probe.returncode == 0


FAULTS = {
    "sigterm": sigterm,
    "sigusr1": sigusr1,
    "sigterm_workers": sigterm_workers,
    "sigterm_in_save": sigterm_in_save,
    "torchrun_sigterm": torchrun_sigterm,
    "kill_default": kill_default,
    "kill_save_every": kill_save_every,
    "kill_in_save": kill_in_save,
    "disk_full": disk_full,
    "full_before_start": full_before_start,
    "truncated_last": truncated_last,
    "empty_last": empty_last,
    "foreign_last": foreign_last,
    "files_vanish": files_vanish,
    "damaged_cache": damaged_cache,
}


def table(rows):
    header = ("fault", "what the user sees", "steps lost", "resume exact")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = (r["fault"], f"`{r['seen']}`" if r["seen"] else "", r["lost"], r["exact"])
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(FAULTS), help="these faults (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    base = tempfile.mkdtemp(prefix="faults_")
    lab, rows, started = Lab(base), [], time.perf_counter()
    try:
        for name in args.only or FAULTS:
            rows.append(FAULTS[name](lab))
            print(f"{name}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        if args.keep:
            print(f"runs kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]), sys.argv[sys.argv.index("--") + 1 :])
    else:
        main()
