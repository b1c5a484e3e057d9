"""What the models look at, in numbers: statistics of stored maps, agreement between models and
methods, the paper's claims as tests, sanity checks (`xtl analyse`, the pipeline's analysis step)."""

from xtl.analysis.run import analyse_runs, read_analysis
from xtl.analysis.localisation import localisation_summary  # noqa: E402,F401  (xtl localisation's table, for the report)
