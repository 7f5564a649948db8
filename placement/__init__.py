"""Placement: which rank (GPU or CPU host) holds each expert; the ExFlow integer program,
baselines, and the expert-parallel runtime. Computing a plan needs no GPU."""

__all__: list[str] = []
