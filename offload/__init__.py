"""Offloading: host expert store, GPU expert cache, policies, prefetcher, CPU computation of
missed experts. Offloaded output equals resident output."""

__all__: list[str] = []
