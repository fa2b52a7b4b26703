"""Helpers shared by the tests: tiny runs through the entrypoint, toy models and classifiers,
checkpoint builders, readers of W&B's offline run files, and statistics recomputed by hand."""
