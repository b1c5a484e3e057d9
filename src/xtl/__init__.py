"""xtl: explainable transfer learning for CNNs and Vision Transformers."""

__version__ = "0.1.0"
