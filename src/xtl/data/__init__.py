"""Data: sources (folders, Hugging Face, torchvision), seeded splits, on-device preprocessing."""

from xtl.data.sources import Source, decode_image, open_source
from xtl.data.splits import Split, SplitPart, SplitSpec, load_split
from xtl.data.transforms import PAPER_MEAN, PAPER_STD, Preprocess

__all__ = [
    "PAPER_MEAN",
    "PAPER_STD",
    "Preprocess",
    "Source",
    "Split",
    "SplitPart",
    "SplitSpec",
    "decode_image",
    "load_split",
    "open_source",
]
