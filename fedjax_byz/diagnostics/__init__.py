"""Diagnostics of gradient skew and robustness: measures and pictures of captured rounds,
and the empirical κ of every rule under every attack (``robustness``)."""

from fedjax_byz.diagnostics.measures import (
    capture_measures,
    densest_point,
    densest_region,
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
    "densest_region",
    "embed",
    "median_skewness",
    "moment_skewness",
    "plot_captures",
    "projections",
    "round_measures",
    "skew_direction",
]
