"""Noise schedules, denoiser wrappers, solvers and guidance."""
