"""Getting a model and a node ready: `prepare-model` (a model from PyPI wheels, offline) and `node-check` (the staged GPU-node check)."""
