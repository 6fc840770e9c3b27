"""Data: dataset cards, annotation sources, media decoding, chat templates, synthetic data."""
