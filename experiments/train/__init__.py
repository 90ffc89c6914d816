"""Training an SAE arm: the trainer, its checkpoints and dead-latent resampling."""
