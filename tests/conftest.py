"""Shared pytest fixtures and helpers."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest


def save_random_tiny_model(path: Path, *, initializer_range: float = 0.02, ascii_only: bool = False) -> str:
    """An UNTRAINED tiny demo model (seed 0) saved into `path`; loads in well under a second.

    ascii_only: zero the output embeddings of every token but printable ASCII and <|im_end|>, so that
    with large weights the greedy reply is readable text that may end on <|im_end|>.
    """
    import torch

    from drift_ray.demo_model import save_untrained_demo_model

    def keep_ascii_only(model, tokenizer) -> None:
        printable = "".join(chr(code) for code in range(32, 127))
        allowed = tokenizer(printable, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        silenced = torch.ones(len(tokenizer), dtype=torch.bool)
        silenced[allowed] = False
        with torch.no_grad():
            model.get_output_embeddings().weight[silenced] = 0.0

    return save_untrained_demo_model(
        path, initializer_range=initializer_range, prepare=keep_ascii_only if ascii_only else None
    )


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest):
    """A new local Ray cluster for a module's tests, of its RAY_NUM_CPUS logical CPUs (default 2); yields
    the ray module. address="local": a bare ray.init would join a cluster that `ray start` runs on the
    machine (and refuse num_cpus)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=getattr(request.module, "RAY_NUM_CPUS", 2), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init tiny model directory (standard init: near-uniform next-token distributions)."""
    return save_random_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def chaotic_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init tiny model with large weights that speaks printable ASCII: its greedy replies differ
    from prompt to prompt and some end early on <|im_end|>, which the standard init never does."""
    return save_random_tiny_model(tmp_path_factory.mktemp("chaotic-tiny-model"), initializer_range=0.3, ascii_only=True)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now: held open together, so the system cannot hand out one twice."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
