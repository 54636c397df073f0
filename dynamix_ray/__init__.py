"""DynamiX on Ray: per-user segmentation, segment-conditional training and serving."""

__all__ = ["__version__"]

__version__ = "0.1.0"
