"""Measuring: bench.py's stages (search, archive-scale embedding, start-up), the archives they run on, and dated
results files."""
