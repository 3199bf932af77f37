"""lcm: multi-label image recognition with latent context and label correlations."""

__version__ = "0.1.0"
