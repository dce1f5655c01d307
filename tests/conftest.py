"""Shared pytest setup: a small, deadline-free hypothesis profile and deterministic threads."""

import os

import torch
from hypothesis import settings

settings.register_profile("default", max_examples=20, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
