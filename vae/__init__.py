"""The autoencoders between pixels and latents: latentloom's AutoencoderKL (diffusers' folders and
single-file VAE keys load into it), loading, encoding and decoding (with tiling), and the weightless
PixelShuffleVAE for pixel-space models. A model part: it imports nothing above the model-parts floor."""
