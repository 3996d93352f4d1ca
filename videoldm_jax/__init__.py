"""Video Latent Diffusion Models (Align your Latents) in JAX/Flax."""
