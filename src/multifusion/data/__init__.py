"""Data: scan a micrograph folder, decode and preprocess, split, store the prepared set; synthesize the default set."""
