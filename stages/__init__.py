"""Training stages: one stage, one file, with its loop written out."""
