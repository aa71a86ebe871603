"""Data sets for training and for quality tests; ``shapes`` is built in and needs no files."""
from .shapes import ShapesBatches, ShapesDataset, judge, judge_batch

__all__ = ["ShapesBatches", "ShapesDataset", "judge", "judge_batch"]
