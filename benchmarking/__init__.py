"""Benchmarks of latentloom against diffusers on identical weights (`latentloom bench`)."""
