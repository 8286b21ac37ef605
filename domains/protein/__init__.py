"""Protein domain: ESM-2 (fair-esm) for protein-protein interaction and sequence tasks."""

from . import tasks  # noqa: F401  (registers protein-ppi and protein-classify)
