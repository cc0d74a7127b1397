"""Smoke test of the whole pipeline on the shipped real data: python test_pipeline.py

One line per step; exits non-zero if any step fails. Under a minute on 2 CPU cores.
The thorough tests are in tests/ (python -m pytest tests).
"""

import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

import embed
import inference
import similar
import train
from model import ConvAutoencoder, masked_mse
from reading.file_index import DEFAULT_DATA_DIR
from stft_dataset import SeismicSTFTDataset, pad_collate

DATA_DIR = DEFAULT_DATA_DIR


def check_dataset(work):
    # The header index goes to the temporary folder: a smoke test leaves the shipped data as it found it.
    dataset = SeismicSTFTDataset(DATA_DIR, index_path=os.path.join(work["tmp"], "index.json"))
    x, meta = dataset[0]
    assert len(dataset) == 163, f"expected 163 usable HH/HN/EH/BH files, found {len(dataset)}"
    assert x.shape == (3, 129, 142) and torch.isfinite(x).all(), f"bad spectrogram {tuple(x.shape)}"
    work["dataset"] = dataset
    return f"{len(dataset)} files, spectrogram {tuple(x.shape)} of {meta['trace_id']}"


def check_model(work):
    work["model"] = ConvAutoencoder()
    n_parameters = sum(p.numel() for p in work["model"].parameters())
    assert n_parameters == 777_987, f"{n_parameters} parameters"
    return f"{n_parameters:,} parameters"


def check_forward_backward(work):
    x = torch.stack([work["dataset"][i][0] for i in range(2)])
    loss = masked_mse(work["model"](x), x, torch.ones(2, x.shape[-1], dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and work["model"].encoder[0][0].weight.grad is not None
    return f"loss {loss.item():.4f}, gradients finite"


def check_padded_batch(work):
    short, meta = work["dataset"][1]
    batch = pad_collate([work["dataset"][0], (short[:, :, :100], meta)])
    assert batch["spectrogram"].shape == (2, 3, 129, 142) and batch["mask"].sum(1).tolist() == [142, 100]
    return "lengths 142 and 100 -> (2, 3, 129, 142) with mask"


def check_training(work):
    data = os.path.join(work["tmp"], "waveforms")
    os.makedirs(data)
    for name in work["dataset"].files[::12]:  # 14 real files across families
        shutil.copy(os.path.join(DATA_DIR, name), data)
    runs, logs = os.path.join(work["tmp"], "checkpoints"), os.path.join(work["tmp"], "logs")
    common = ["--num_workers", "0", "--batch_size", "4", "--checkpoint_dir", runs, "--log_dir", logs]
    summary = train.main(["--data_dir", data, "--num_epochs", "1", *common])
    work["run_dir"], work["common"] = summary["run_dir"], common
    assert os.path.exists(os.path.join(summary["run_dir"], "best_model.pt"))
    return f"1 epoch, val loss {summary['best_val_loss']:.4f}, checkpoint written"


def check_resume(work):
    summary = train.main(["--resume", os.path.join(work["run_dir"], "last.pt"), "--num_epochs", "2", *work["common"]])
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and summary["run_dir"] == work["run_dir"]
    return f"epoch 2 in the same run, val loss {summary['history'][-1]['val_loss']:.4f}"


def check_cache(work):
    data, cache_dir = os.path.join(work["tmp"], "waveforms"), os.path.join(work["tmp"], "cache")
    summary = train.main(["--data_dir", data, "--num_epochs", "1", "--cache_dir", cache_dir, *work["common"]])
    cached, direct = SeismicSTFTDataset(data, cache_dir=cache_dir)[0][0], SeismicSTFTDataset(data)[0][0]
    error = (cached.float() - direct).abs().max().item()
    assert cached.dtype == torch.float16 and error <= 2**-12, f"cached spectrogram off by {error}"
    return f"1 epoch from --cache_dir, val loss {summary['best_val_loss']:.4f}; float16 within {error:.5f}"


def check_inference(work):
    out = os.path.join(work["tmp"], "results")
    metrics = inference.main([os.path.join(work["run_dir"], "best_model.pt"), "--output_dir", out, "--num_plots", "1"])
    assert os.path.exists(os.path.join(out, "metrics.json")) and any(p.endswith(".png") for p in os.listdir(out))
    return f"{metrics['num_samples']} samples, model MSE {metrics['model']['mse']['overall']:.4f}"


def check_embedding(work):
    out, data = os.path.join(work["tmp"], "embeddings"), os.path.join(work["tmp"], "waveforms")
    argv = [os.path.join(work["run_dir"], "best_model.pt"), "--data_dir", data, "--output_dir", out]
    summary = embed.main(argv + ["--num_anomalies", "1", "--projector_points", "5", "--labels", "family"])
    wanted = ("embeddings.npy", "catalog.csv", "clusters.json", "map.png", "projector")
    assert all(os.path.exists(os.path.join(out, name)) for name in wanted), sorted(os.listdir(out))
    nearest = similar.main(
        [out, os.path.join(data, sorted(n for n in os.listdir(data) if n.endswith(".mseed"))[0]), "-k", "2"]
    )
    assert nearest[0]["distance"] < 1e-3, "a catalogued file is not its own nearest neighbour"
    accuracy = summary["labels"]["scores"]["model (readout)"]["knn_accuracy"]
    return f"{summary['rows']} recordings x {summary['dim']}, family 5-NN accuracy {accuracy:.2f}; similar.py answers"


STEPS = [
    check_dataset,
    check_model,
    check_forward_backward,
    check_padded_batch,
    check_training,
    check_resume,
    check_cache,
    check_inference,
    check_embedding,
]


def main():
    passed = failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = {"tmp": tmp}
        for step in STEPS:
            start = time.perf_counter()
            try:
                detail = step(work)
                print(f"PASS {step.__name__[6:]:<16} {time.perf_counter() - start:5.1f} s  {detail}", flush=True)
                passed += 1
            except Exception:
                failures += 1
                print(f"FAIL {step.__name__[6:]:<16}\n{traceback.format_exc()}", flush=True)
                break  # later steps build on earlier ones
    print(f"{passed} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
