"""Runnable research scripts, one experiment each: ``python -m experiments.<name> --help``.

They are a package so that they share code by import (``experiments.stdlib_text``,
``experiments.finetune_common``) and the benchmarks and tests can call their ``main``.
"""
