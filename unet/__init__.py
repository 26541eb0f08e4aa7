"""The denoiser: a UNet that reads the prompt through cross-attention."""
