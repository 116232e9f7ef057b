"""Shared plumbing: the typed config, user errors, atomic files, output-path guards, runtime threads, timings, plots."""
