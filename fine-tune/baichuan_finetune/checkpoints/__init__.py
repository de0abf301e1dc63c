"""Weight files, checkpoints as transactions, saving, fingerprints, trust and resume checks."""
