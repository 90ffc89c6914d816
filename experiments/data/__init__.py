"""Where activations come from: the transformer and synthetic sources and the activation cache."""
