"""torchrun entry point for tests/test_scale.py: train.main() with a record of what each process read.

    PROBE_DIR=/tmp/probe torchrun --standalone --nproc_per_node 2 tests/ddp_probe.py --data_dir ... --device cpu

After every epoch each process writes $PROBE_DIR/rank{R}_epoch{E}.txt (the files it trained on, one path
a line), $PROBE_DIR/rank{R}_epoch{E}_val.txt (the validation files it evaluated) and
$PROBE_DIR/rank{R}_epoch{E}_model.pt (the state dict it evaluated them with). The recording is the test's
own: train.train_epoch and train.evaluate (imported there from training.py) are wrapped here, train.py is unchanged.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  (needs the repository root on sys.path)
from running.checkpoints import clean_state_dict  # noqa: E402

PROBE_DIR = os.environ["PROBE_DIR"]
original_train_epoch, original_evaluate = train.train_epoch, train.evaluate
current_epoch = [0]


def recording(loader, paths):
    """Yields the loader's batches, noting the path of every sample in them."""
    for batch in loader:
        paths.extend(meta["path"] for meta in batch["meta"])
        yield batch


def write(name, paths):
    with open(os.path.join(PROBE_DIR, name), "w") as f:
        f.write("".join(path + "\n" for path in paths))


def train_epoch(model, loader, optimizer, scaler, autocast, device, skips, epoch, *rest, **keywords):
    paths = []
    result = original_train_epoch(
        model, recording(loader, paths), optimizer, scaler, autocast, device, skips, epoch, *rest, **keywords
    )
    current_epoch[0] = epoch
    write(f"rank{dist.get_rank()}_epoch{epoch}.txt", paths)
    return result


def evaluate(model, loader, autocast, device, skips, band=None):
    name = f"rank{dist.get_rank()}_epoch{current_epoch[0]}"
    torch.save(clean_state_dict(model.state_dict()), os.path.join(PROBE_DIR, f"{name}_model.pt"))
    paths = []
    result = original_evaluate(model, recording(loader, paths), autocast, device, skips, band)
    write(f"{name}_val.txt", paths)
    return result


if __name__ == "__main__":
    train.train_epoch, train.evaluate = train_epoch, evaluate
    train.main()
