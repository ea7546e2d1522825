"""Studies and reports: clients of finished runs (results.json, diverged.json, adapter/, checkpoints). Nothing in
the algorithm or the runner imports them.

- `errors`: `StudyError`, the one error of the studies (a one-line message on stderr, exit code 2).
- `runs`: finding and reading runs, and the learning rate and α a run applied (with the fallback for
  results.json written before the runner recorded them).
- `plots`: the plots across runs (a run's own plots are ``adarank.runner.plots``).
- `report` (``python -m adarank.report``), `rank_study`, `norm_study`, `spectra` (``python -m adarank.analyze``).
"""
