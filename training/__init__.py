"""sae_kit.training: the trainer loop, losses, schedules and dead-latent tracking."""

from sae_kit.training.trainer import NonFiniteError, TrainConfig, Trainer

__all__ = ["NonFiniteError", "TrainConfig", "Trainer"]
