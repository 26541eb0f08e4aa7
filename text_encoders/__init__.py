"""Frozen text encoders (CLIP, T5, MiniLM), tokenization, long and weighted prompts."""
from latentloom.text_encoders.embedding import TextEmbedding

__all__ = ["TextEmbedding"]
