"""Tests of adarank.studies. A package, so that its test_plots.py and tests/runner/test_plots.py do not clash."""
