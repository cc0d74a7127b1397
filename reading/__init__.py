"""Reading: miniSEED and SeisBench input, 3-component recordings and windows, the header index, the one STFT, the
spectrogram cache, augmentations and batches of one length (path -> waveform -> spectrogram -> batch)."""
