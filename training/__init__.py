"""Fine-tuning and training on captioned images with accelerate."""
