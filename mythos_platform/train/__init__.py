"""Pretraining on Ray Train: FSDP2/DDP workers, DCP checkpoints, MLflow tracking."""

from .trainer import PretrainResult, print_summary, run_pretrain

__all__ = ["PretrainResult", "print_summary", "run_pretrain"]
