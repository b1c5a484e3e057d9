"""Fine-tuning: Adam/AdamW + cross-entropy under Lightning Fabric, best checkpoint kept."""

from xtl.train.loop import TrainState, finetune

__all__ = ["TrainState", "finetune"]
