"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


def save_random_tiny_model(path: Path, *, initializer_range: float = 0.02, seed: int = 0) -> str:
    """Save the demo tokenizer and an UNTRAINED tiny Qwen2 into `path`; loads in well under a second."""
    import torch
    from transformers import AutoModelForCausalLM

    from drift_ray.demo_model import build_model_config, build_tokenizer

    tokenizer = build_tokenizer()
    config = build_model_config(len(tokenizer), tokenizer=tokenizer)
    config.initializer_range = initializer_range
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init tiny model directory (standard init: near-uniform next-token distributions)."""
    return save_random_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def chaotic_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init tiny model with large weights: its greedy replies differ from prompt to prompt and
    some end early on the end-of-turn token, which the standard init never does."""
    return save_random_tiny_model(tmp_path_factory.mktemp("chaotic-tiny-model"), initializer_range=0.3)
