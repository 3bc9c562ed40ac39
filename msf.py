"""The multi-scale fusion VQ-VAE and its quantisers. Not implemented yet."""
