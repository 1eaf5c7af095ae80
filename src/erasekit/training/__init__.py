"""The one training loop every fine-tuning method shares: what is trained (full tensors or LoRA
adapters), seeded data per step, resumable atomic checkpoints, progress and the run's record."""

from .loop import (
                   Checkpoint,
                   Trainable,
                   TrainingConfig,
                   identity_of,
                   progress_reporter,
                   run_training,
                   step_generator,
)

__all__ = ["Checkpoint", "Trainable", "TrainingConfig", "identity_of", "progress_reporter", "run_training", "step_generator"]
