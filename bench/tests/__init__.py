"""Tests of the benchmark scripts: their own code paths in --small modes, and their helpers."""
