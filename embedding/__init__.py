"""Embedding: latents pooled into one vector per recording, the read-out, the catalogue, clusters and scores, the
FAISS index, figures and the baselines that need no training."""
