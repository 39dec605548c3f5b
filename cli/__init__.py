"""The ``editpack`` command (installed as ``editpack.cli``); each command is a thin layer over the library."""
