"""What the models look at, in numbers: statistics of stored maps, agreement between models and
methods, the paper's claims as tests, sanity checks (`xtl analyse`, the pipeline's analysis step)."""

from xtl.analysis.run import analyse_runs, read_analysis

__all__ = ["analyse_runs", "read_analysis"]
