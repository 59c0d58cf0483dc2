"""Data modules for syncnorm's training app; all of them work offline.

* :class:`DigitsDataModule`: scikit-learn's shipped 8x8 handwritten digits (classification).
* :class:`ShapesDataModule`: generated rectangles/ellipses/triangles with boxes (detection).
"""

from .digits import DigitsDataModule
from .shapes import CLASS_NAMES, ShapesDataModule, ShapesDataset, collate_detection

__all__ = ["DigitsDataModule", "ShapesDataModule", "ShapesDataset", "collate_detection", "CLASS_NAMES"]
