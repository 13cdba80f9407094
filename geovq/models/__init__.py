"""Models: one shared conv trunk (trunk.py), the Gaussian VAE (vae.py) and the VQ-VAE (vqvae.py)."""
