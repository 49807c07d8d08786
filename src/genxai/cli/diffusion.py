"""Commands: train, sample, fid, ablate."""
