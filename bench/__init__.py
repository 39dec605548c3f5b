"""editpack's benchmarks: each module is a script run from the repository root as ``python3 -m bench.NAME`` that
prints (and with ``--out`` writes) one JSON object; :mod:`bench._common` holds the floors they are measured
against. Their tests are in ``bench/tests`` (a ``--small`` mode of each script on a tiny model)."""
