"""The autoencoders between pixels and latents: loading a VAE folder, encoding and decoding
(with tiling), and the weightless PixelShuffleVAE for pixel-space models. A model part: it
imports nothing above the model-parts floor."""
