"""Dataset preparation: TFDS builders (array_record) for video folders and WebVid, and latent pre-encoding."""
