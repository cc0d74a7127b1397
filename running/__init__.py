"""Running: the settings of every script, the training recipe, a run's data, records and checkpoints, the device,
torchrun, preemption and atomic storage."""
