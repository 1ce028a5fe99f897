"""Diagnostics of gradient skew and robustness: measures and pictures of captured rounds."""

from fedjax_byz.diagnostics.measures import (
    capture_measures,
    densest_point,
    median_skewness,
    moment_skewness,
    projections,
    round_measures,
    skew_direction,
)
from fedjax_byz.diagnostics.pictures import embed, plot_captures

__all__ = [
    "capture_measures",
    "densest_point",
    "embed",
    "median_skewness",
    "moment_skewness",
    "plot_captures",
    "projections",
    "round_measures",
    "skew_direction",
]
