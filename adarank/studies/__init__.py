"""Studies and reports: clients of finished runs (results.json, adapter/, checkpoints). Nothing in the
algorithm or the runner imports them."""
