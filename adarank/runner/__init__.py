"""The runner: typed config, method builders, data, the training loop and its step unit, checkpoints, tracking.

`python -m adarank.run` is its command line. It imports the algorithm (the top of the package) and the fast
path, never the studies.
"""
