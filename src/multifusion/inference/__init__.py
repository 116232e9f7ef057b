"""Inference on new micrographs: predict, explain, overlays, the screening report."""
