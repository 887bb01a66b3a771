"""Sweeps: datasets in, Parquet shards out, resumable, on many processes with torchrun."""

from emovec.sweep.core import POOLS, SweepError, run_sweep
from emovec.sweep.result import SweepResult

__all__ = ["POOLS", "SweepError", "SweepResult", "run_sweep"]
