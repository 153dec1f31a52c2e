"""Model definitions: transformer, attention, norms, activations, MLPs."""
