"""Train stage: LoRA fine-tuning on Ray Train with DeepSpeed ZeRO (see stage.py for the flow)."""

from synthpert.train.stage import train

__all__ = ["train"]
