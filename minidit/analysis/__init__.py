"""The redundancy measurement: recorder, run directory, aggregation and figures (../design/analysis.md)."""

from minidit.analysis.aggregate import METRICS, Run, aggregate, derive, read_run
from minidit.analysis.recorder import SUMS, TENSORS, Recorder
from minidit.analysis.rundir import RunDir

__all__ = ["METRICS", "SUMS", "TENSORS", "Recorder", "Run", "RunDir", "aggregate", "derive", "read_run"]
