"""Pruning family: structured pruning that removes parameters, and token merging."""
