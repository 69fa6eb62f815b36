"""dedupimg: a deduplicating, crash-safe backup repository for whole disk and VM images."""

__version__ = "0.1.0"
