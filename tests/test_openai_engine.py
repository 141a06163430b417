"""Tests of the OpenAI-compatible engine against real servers on loopback ports: `transformers serve`
with an untrained tiny model, and small aiohttp servers that act like vLLM, SGLang, OpenAI's hosted API
or a failing server."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web

from drift_ray.builtin_tasks import candidates_task
from drift_ray.config import EngineKind, EpisodeConfig, RolloutConfig
from drift_ray.demo_model import build_tokenizer
from drift_ray.engines import build_engine, cut_at_stop
from drift_ray.episode import ANSWER_STOP, SamplingParams, play_episodes
from drift_ray.openai_engine import OpenAIEngine, OpenAIServerError
from drift_ray.verifiers import get_verifier
from tests.conftest import free_ports, save_random_tiny_model

TOKENIZER = build_tokenizer()  # the served demo model's

CONVERSATION = [{"role": "user", "content": "What is 2+2?"}]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in ("What is 2+2?", "hello", "x is between 12 and 31. What is x?")]
NO_KEY_ENV = "DRIFT_TEST_KEY_THAT_IS_NOT_SET"
SERVER_START_S = 90

Handler = Callable[[dict[str, Any], dict[str, str]], Awaitable[web.Response]]


def engine_for(api_base: str, model: str = "m", **options: Any) -> OpenAIEngine:
    settings: dict[str, Any] = dict(api_key_env=NO_KEY_ENV, retry_backoff_s=0.01, request_timeout_s=30.0)
    return OpenAIEngine(model, api_base=api_base, **(settings | options))


# ---------------------------------------------------------------- transformers serve


class ServedModel:
    def __init__(self, api_base: str, model: str):
        from transformers import AutoTokenizer

        self.api_base = api_base
        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def engine(self, **options: Any) -> OpenAIEngine:
        return engine_for(self.api_base, self.model, **options)

    def prompt_tokens(self, conversation: list[dict[str, str]]) -> int:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """`transformers serve` on a free loopback port, serving an untrained tiny model that speaks printable
    ASCII (so a stop string can be picked from its replies) and samples when asked to (do_sample in its
    generation config: the server's default is the model's, greedy)."""
    from transformers import GenerationConfig

    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn", "openai")):
        pytest.skip("transformers serve needs transformers[serving] (fastapi, uvicorn, openai)")
    root = tmp_path_factory.mktemp("served")
    model = save_random_tiny_model(root / "model", initializer_range=0.3, ascii_only=True)
    GenerationConfig(
        do_sample=True, top_k=0, eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id
    ).save_pretrained(model)
    # /v1/models lists the hub cache, and fails when there is none: give it an empty one. Offline: the
    # model is a local directory.
    (root / "hub").mkdir()
    env = os.environ | {"HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    [port] = free_ports(1)
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", model]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/v1/models", server, log_path)
        yield ServedModel(f"http://127.0.0.1:{port}/v1", model)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def wait_until_ready(url: str, server: subprocess.Popen, log_path: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"transformers serve: {url} not ready within {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.server
def test_n_samples_per_conversation_with_token_counts_from_usage(served):
    engine = served.engine(max_concurrency=4)
    results = engine.generate(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=8, stop=(), seed=0), 3)
    assert [len(group) for group in results] == [3] * len(CONVERSATIONS)
    for conversation, group in zip(CONVERSATIONS, results):
        for generation in group:
            assert generation.prompt_tokens == served.prompt_tokens(conversation)
            # An end of turn counts but is not text; the text never holds more tokens than were generated.
            # Sampling can pick a byte token outside printable ASCII (its logit is 0, not -inf). Bytes that make
            # no whole UTF-8 character arrive as U+FFFD, each standing for at least one generated token.
            assert 1 <= generation.completion_tokens <= 8
            whole = generation.text.replace("\ufffd", "")
            in_text = len(TOKENIZER(whole, add_special_tokens=False)["input_ids"]) + generation.text.count("\ufffd")
            assert in_text <= generation.completion_tokens
    # transformers serve answers a request for n choices with one: the rest came from single requests.
    assert engine.n_per_request is False


@pytest.mark.server
def test_seeded_sampling_replays_and_depends_on_the_seed(served):
    # One request at a time: transformers serve seeds its process-wide generator per request.
    engine = served.engine(max_concurrency=1)

    def sample(seed: int) -> list[str]:
        params = SamplingParams(temperature=1.0, max_new_tokens=12, stop=(), seed=seed)
        return [g.text for g in engine.generate([CONVERSATION], params, 3)[0]]

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first
    assert len(set(first)) > 1


@pytest.fixture(scope="module")
def greedy_replies(served) -> list[str]:
    greedy = SamplingParams(temperature=0, max_new_tokens=32, stop=())
    return [group[0].text for group in served.engine().generate(CONVERSATIONS, greedy, 1)]


@pytest.mark.server
def test_stop_string_ends_the_reply_and_is_kept(served, greedy_replies):
    reference = max(greedy_replies, key=len)
    conversation = CONVERSATIONS[greedy_replies.index(reference)]
    assert len(reference) >= 8, f"the tiny model's greedy reply is too short to pick a stop string from: {reference!r}"
    stop = reference[len(reference) // 2 : len(reference) // 2 + 2]
    engine = served.engine()
    reply = engine.generate([conversation], SamplingParams(temperature=0, max_new_tokens=32, stop=(stop,)), 1)[0][0]
    assert reply.text == cut_at_stop(reference, [stop])
    assert reply.text.endswith(stop) and len(reply.text) < len(reference)
    # transformers serve keeps the stop string, so the engine keeps sending `stop`.
    assert engine.stop_on_server is True


@pytest.mark.server
def test_max_tokens_is_respected(served, greedy_replies):
    engine = served.engine()
    short = engine.generate(CONVERSATIONS, SamplingParams(temperature=0, max_new_tokens=5, stop=()), 1)
    for reference, [reply] in zip(greedy_replies, short):
        assert reference.startswith(reply.text)
        assert reply.completion_tokens <= 5
        if len(reference) > len(reply.text):  # cut short by the limit, not by an end of turn
            assert reply.completion_tokens == 5


@pytest.mark.server
def test_play_episodes_through_transformers_serve(served):
    cfg = EpisodeConfig(max_turns=2)
    problems = candidates_task(0, num_train=3, num_test=1).train
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=0)
    episodes = play_episodes(problems, served.engine(max_concurrency=4), get_verifier("exact"), params, 2, cfg)
    assert [(e.problem.prompt_id, e.sample_index) for e in episodes] == [(p.prompt_id, k) for p in problems for k in range(2)]
    for episode in episodes:
        turns = len(episode.correct)
        assert 1 <= turns <= 2 and episode.done
        assert [m["role"] for m in episode.messages] == ["user"] + ["assistant", "user"] * (turns - 1) + ["assistant"]
        if turns == 2:
            assert episode.messages[2]["content"] == cfg.feedback
        assert episode.prompt_tokens >= turns * served.prompt_tokens(episode.messages[:1])
        assert turns <= episode.completion_tokens <= turns * 16


# ---------------------------------------------------------------- small aiohttp servers


class FakeServer:
    """A real HTTP server on a loopback port (its own thread and event loop) whose /v1/chat/completions
    answers come from `handler(body, headers)`; it records every request and the most requests in flight."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        # Cancel a handler whose client hung up (a timed-out request), so shutting down does not wait for it.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.handler(body, dict(request.headers))
        finally:
            self.in_flight -= 1


def choice(content: str, finish_reason: str = "stop", **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason, **extra}


def completion(*choices: dict[str, Any], prompt_tokens: int = 7, completion_tokens: int = 3) -> web.Response:
    indexed = [{"index": i, **c} for i, c in enumerate(choices)]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return web.json_response({"object": "chat.completion", "choices": indexed, "usage": usage})


def answer_with_statuses(*statuses: int) -> Handler:
    """Answer the i-th request with statuses[i] (an error body unless 200), and 200 after the last."""
    count = 0

    async def handler(body: dict[str, Any], headers: dict[str, str]) -> web.Response:
        nonlocal count
        status = statuses[min(count, len(statuses) - 1)]
        count += 1
        if status == 200:
            return completion(choice("<answer>4</answer>"))
        return web.json_response({"error": f"status {status} number {count}"}, status=status)

    return handler


def test_a_request_carries_the_sampling_params():
    async def handler(body, headers):
        return completion(choice("<answer>4</answer>"))

    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=33, stop=("</answer>", "END"), seed=11)
    with FakeServer(handler) as server:
        [[reply]] = engine_for(server.api_base, "served-name").generate([CONVERSATION], params, 1)
    assert server.requests == [
        {
            "model": "served-name",
            "messages": CONVERSATION,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_tokens": 33,
            "stop": ["</answer>", "END"],
            "seed": 11,
        }
    ]
    assert "authorization" not in {k.lower() for k in server.headers[0]}
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ("<answer>4</answer>", 7, 3)


def test_retries_after_503_429_and_408_then_succeeds_and_the_first_retry_is_told(caplog):
    with FakeServer(answer_with_statuses(503, 429, 408, 200)) as server:
        with caplog.at_level(logging.WARNING, logger="drift_ray.openai_engine"):
            [[reply]] = engine_for(server.api_base, max_retries=3).generate([CONVERSATION], SamplingParams(), 1)
    assert len(server.requests) == 4
    assert reply.text == "<answer>4</answer>"
    [told] = [record.getMessage() for record in caplog.records]  # a busy server is not a flood of warnings
    assert "HTTP 503" in told and "retrying (each request up to rollout.max_retries=3 times" in told


def test_gives_up_after_max_retries_naming_the_url_and_the_status():
    with FakeServer(answer_with_statuses(503)) as server:
        engine = engine_for(server.api_base, max_retries=2)
        with pytest.raises(OpenAIServerError) as caught:
            engine.generate([CONVERSATION], SamplingParams(), 1)
    assert len(server.requests) == 3
    message = str(caught.value)
    assert engine.url in message and "HTTP 503" in message and "status 503 number 3" in message
    assert "3 attempts" in message and "rollout.max_retries=2" in message
    assert caught.value.status == 503
    # As Ray hands an actor's error to the driver.
    caught.value.add_note("while playing batch 3")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (type(copy), str(copy), copy.url, copy.status) == (OpenAIServerError, message, engine.url, 503)
    assert copy.__notes__ == ["while playing batch 3"]


def test_a_client_error_is_not_retried():
    with FakeServer(answer_with_statuses(404)) as server:
        engine = engine_for(server.api_base, max_retries=3)
        with pytest.raises(OpenAIServerError, match="HTTP 404") as caught:
            engine.generate([CONVERSATION], SamplingParams(), 1)
    assert len(server.requests) == 1
    assert engine.url in str(caught.value) and "rollout.api_base" in str(caught.value)


def test_connection_errors_are_retried_then_reported():
    engine = engine_for(f"http://127.0.0.1:{free_ports(1)[0]}/v1", max_retries=2)
    with pytest.raises(OpenAIServerError) as caught:
        engine.generate([CONVERSATION], SamplingParams(), 1)
    message = str(caught.value)
    assert engine.url in message and "Connect" in message and "3 attempts" in message
    assert caught.value.status is None


def test_a_timeout_names_the_url_and_the_config_key_and_is_not_retried():
    async def slow(body, headers):
        await asyncio.sleep(10)
        return completion(choice("late"))

    with FakeServer(slow) as server:
        engine = engine_for(server.api_base, request_timeout_s=0.3, max_retries=3)
        started = time.monotonic()
        with pytest.raises(OpenAIServerError) as caught:
            engine.generate([CONVERSATION], SamplingParams(), 1)
        elapsed = time.monotonic() - started
    assert len(server.requests) == 1 and elapsed < 3
    message = str(caught.value)
    assert engine.url in message and "0.3 s" in message and "rollout.request_timeout_s" in message


@pytest.mark.parametrize("written", ["", " ", "\n"], ids=["as-is", "trailing-space", "trailing-newline"])
def test_the_api_key_is_sent_but_never_shown(monkeypatch, written):
    secret = "sk-test-0123456789abcdef"
    # A space after the key is dropped from the header on the way, so a server echoes the key without it.
    monkeypatch.setenv("DRIFT_TEST_API_KEY", secret + written)

    async def unauthorized(body, headers):
        # Some servers echo the credentials they refuse.
        return web.json_response({"error": f"Incorrect API key provided: {headers['Authorization']}"}, status=401)

    with FakeServer(unauthorized) as server:
        engine = engine_for(server.api_base, api_key_env="DRIFT_TEST_API_KEY")
        with pytest.raises(OpenAIServerError) as caught:
            engine.generate([CONVERSATION], SamplingParams(), 1)
    assert server.headers[0]["Authorization"] == f"Bearer {secret}"
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value) + repr(engine) + str(vars(caught.value))
    assert secret not in shown
    message = str(caught.value)
    assert "HTTP 401" in message and engine.url in message and "DRIFT_TEST_API_KEY" in message
    assert "not that of the shell that ran drift-ray" in message  # a cluster's actors have their node's environment
    assert "Incorrect API key provided: Bearer ***" in message


@pytest.mark.parametrize("api_key_env", ["gsk_live_abc123SECRET", "hf_SECRETxyz", "sk-proj-SECRET", "openai_api_key_SECRET"])
def test_an_api_key_given_for_its_variable_is_refused_without_being_shown(api_key_env):
    # Made in code, the engine bypasses the config's check; its repr and HTTP 401 error would show the value.
    with pytest.raises(ValueError) as caught:
        engine_for("http://127.0.0.1:9/v1", api_key_env=api_key_env)
    message = str(caught.value)
    assert message.startswith("rollout.api_key_env: expected the name of an environment variable") and "SECRET" not in message


def seed_echo(*, honours_n: bool, rejects_n: bool) -> Handler:
    """A server whose reply names the seed (and choice) it was asked for, honouring, rejecting or ignoring n."""

    async def handler(body, headers):
        n = body.get("n", 1)
        if n > 1 and rejects_n:
            return web.json_response({"detail": "n > 1 is not supported"}, status=422)
        count = n if honours_n else 1
        return completion(*(choice(f"seed {body.get('seed')} choice {i}") for i in range(count)))

    return handler


@pytest.mark.parametrize("rejects_n", [True, False], ids=["rejects-n", "ignores-n"])
def test_without_n_the_missing_samples_come_from_seeded_single_requests(rejects_n):
    params = SamplingParams(stop=(), seed=10)
    with FakeServer(seed_echo(honours_n=False, rejects_n=rejects_n)) as server:
        engine = engine_for(server.api_base)
        [texts] = [[g.text for g in group] for group in engine.generate([CONVERSATION], params, 3)]
        assert texts == ["seed 10 choice 0", "seed 11 choice 0", "seed 12 choice 0"]
        # Refused: three single requests follow; ignored: its one choice is kept and two follow.
        assert len(server.requests) == (4 if rejects_n else 3)
        assert server.requests[0]["n"] == 3 and all("n" not in r for r in server.requests[1:])
        assert engine.n_per_request is False
        sent = len(server.requests)
        engine.generate([CONVERSATION, CONVERSATION], params, 3)
        later = server.requests[sent:]
    assert len(later) == 6 and all("n" not in r for r in later)
    assert sorted(r["seed"] for r in later) == [10, 11, 12, 13, 14, 15]


def test_a_refusal_that_single_requests_get_too_keeps_n_per_request():
    async def handler(body, headers):
        return web.json_response({"error": "this prompt is longer than the context"}, status=400)

    with FakeServer(handler) as server:
        engine = engine_for(server.api_base)
        with pytest.raises(OpenAIServerError, match="HTTP 400"):
            engine.generate([CONVERSATION], SamplingParams(), 3)
    assert server.requests[0]["n"] == 3 and engine.n_per_request is True


@pytest.mark.parametrize("n", [1, 2])
def test_conversations_with_the_same_history_get_seeds_of_their_own(n):
    # Episodes whose turns so far agree ask again together; one seed for all would make them reply alike.
    with FakeServer(seed_echo(honours_n=True, rejects_n=False)) as server:
        replies = engine_for(server.api_base).generate([CONVERSATION] * 3, SamplingParams(stop=(), seed=10), n)
    assert sorted(r["seed"] for r in server.requests) == [10, 10 + n, 10 + 2 * n]
    texts = [g.text for group in replies for g in group]
    assert len(set(texts)) == len(texts) == 3 * n


def test_n_choices_in_one_request_share_the_usage():
    async def handler(body, headers):
        contents = ["a" * 20, "b" * 5, "c" * 2]
        return completion(*(choice(c, "length") for c in contents), prompt_tokens=9, completion_tokens=30)

    with FakeServer(handler) as server:
        engine = engine_for(server.api_base)
        [group] = engine.generate([CONVERSATION], SamplingParams(seed=1), 3)
    assert len(server.requests) == 1 and server.requests[0]["n"] == 3
    assert [g.prompt_tokens for g in group] == [9, 9, 9]
    counts = [g.completion_tokens for g in group]
    assert sum(counts) == 30 and counts[0] > counts[1] > counts[2] >= 1
    assert engine.n_per_request is True


@pytest.mark.parametrize(
    "server_choices",
    [
        # vLLM: the stop string is stripped and named in stop_reason (null: the end-of-turn token).
        [choice("<answer>4", stop_reason=ANSWER_STOP), choice("no answer", stop_reason=None)],
        # SGLang: named in matched_stop (a token id for the end-of-turn token).
        [choice("<answer>4", matched_stop=ANSWER_STOP), choice("no answer", matched_stop=151645)],
        # transformers serve, TGI: kept in the text.
        [choice("<answer>4</answer>"), choice("no answer")],
    ],
    ids=["vllm", "sglang", "kept"],
)
def test_a_reply_ends_with_the_stop_string_it_stopped_on(server_choices):
    async def handler(body, headers):
        return completion(*server_choices)

    with FakeServer(handler) as server:
        engine = engine_for(server.api_base)
        [group] = engine.generate([CONVERSATION], SamplingParams(seed=0), 2)
    assert [g.text for g in group] == ["<answer>4</answer>", "no answer"]
    assert len(server.requests) == 1 and engine.stop_on_server is True


def test_a_reply_that_reached_max_tokens_is_cut_off_unless_it_holds_a_stop_string():
    async def handler(body, headers):
        return completion(
            choice("<answer>4 is what I", "length"),
            choice("<answer>4</answer> and so on", "length"),  # cut here, at the stop string: it ended
            choice("no answer"),
        )

    with FakeServer(handler) as server:
        [group] = engine_for(server.api_base).generate([CONVERSATION], SamplingParams(seed=0), 3)
    assert [(g.text, g.cut_off) for g in group] == [
        ("<answer>4 is what I", True),
        ("<answer>4</answer>", False),
        ("no answer", False),
    ]


def test_a_reply_the_server_did_not_finish_is_refused_and_a_filtered_one_is_cut_off():
    reasons = iter(["content_filter", None, "abort", "tool_calls"])

    async def handler(body, headers):
        return completion(choice("<answer>4 is", next(reasons)))

    with FakeServer(handler) as server:
        engine = engine_for(server.api_base)
        [[filtered]] = engine.generate([CONVERSATION], SamplingParams(stop=()), 1)
        [[unsaid]] = engine.generate([CONVERSATION], SamplingParams(stop=()), 1)  # some servers leave it null
        assert (filtered.cut_off, unsaid.cut_off) == (True, False)
        for reason in ("abort", "tool_calls"):  # an aborted request's reply is no reply the policy ended
            with pytest.raises(OpenAIServerError, match=rf"finish_reason '{reason}', not 'stop' or 'length'"):
                engine.generate([CONVERSATION], SamplingParams(stop=()), 1)
    assert len(server.requests) == 4  # refused, not retried


@pytest.mark.parametrize(
    "reply, expected",
    [
        ({"message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}}, "I can't help with that."),
        ({"message": {"role": "assistant", "content": "", "refusal": None}}, ""),  # the model wrote nothing: its reply
        ({"message": {"role": "assistant", "content": None}}, "a message with keys ['content', 'role']"),
        ({"message": {"role": "assistant"}}, "a message with keys ['role']"),
        ({}, "no message"),
        # Cut short (a reasoning parser's reply that hit max_tokens inside its reasoning; a filtered one): empty.
        ({"message": {"role": "assistant", "content": None, "reasoning_content": "Let me"}, "finish_reason": "length"}, ""),
        ({"message": {"role": "assistant"}, "finish_reason": "content_filter"}, ""),
        ({"message": {"role": "assistant", "content": None, "reasoning_content": "4"}}, ""),  # all of it apart
    ],
)
def test_a_reply_without_text_is_refused_unless_it_is_a_refusal(reply, expected):
    """Before, each became an empty reply, graded as a format failure and trained on."""

    async def handler(body, headers):
        return completion({"finish_reason": "stop", **reply})

    with FakeServer(handler) as server:
        engine = engine_for(server.api_base)
        if not expected.startswith(("a message", "no message")):
            [[generation]] = engine.generate([CONVERSATION], SamplingParams(stop=()), 1)
            assert generation.text == expected
        else:
            with pytest.raises(OpenAIServerError, match=rf"{engine.url}: a reply without text content \({re.escape(expected)}\)"):
                engine.generate([CONVERSATION], SamplingParams(stop=()), 1)


@pytest.mark.parametrize(
    "usage, problem",
    [
        ({"prompt_tokens": "ten"}, "usage.prompt_tokens is 'ten'; expected a whole number of tokens"),
        ({"completion_tokens": -1}, "usage.completion_tokens is -1"),
        ({"prompt_tokens": 2.5}, "usage.prompt_tokens is 2.5"),
        ([7, 3], "'usage' is a list; expected an object"),
    ],
)
def test_a_usage_that_is_not_token_counts_is_refused_naming_the_server(usage, problem):
    async def handler(body, headers):
        return web.json_response({"choices": [{"index": 0, **choice("<answer>4</answer>")}], "usage": usage})

    with FakeServer(handler) as server:
        engine = engine_for(server.api_base)
        with pytest.raises(OpenAIServerError, match=re.escape(f"{engine.url}: {problem}")):
            engine.generate([CONVERSATION], SamplingParams(), 1)


def test_a_redirect_is_reported_not_followed():
    async def moved(body, headers):
        return web.Response(status=307, headers={"Location": "/v1/chat/completions"})

    with FakeServer(moved) as server:
        engine = engine_for(server.api_base, max_retries=3)
        with pytest.raises(OpenAIServerError, match="HTTP 307.*the server redirects: set rollout.api_base"):
            engine.generate([CONVERSATION], SamplingParams(), 1)
    assert len(server.requests) == 1


def test_a_garbled_answer_is_retried_then_reported_without_the_key(monkeypatch):
    import socketserver

    secret = "sk-test-garbled-0123456789"
    monkeypatch.setenv("DRIFT_TEST_API_KEY", secret)
    requests = []

    class Garbled(socketserver.StreamRequestHandler):
        def handle(self):
            requests.append(self.rfile.readline())
            self.wfile.write(b"this is no HTTP\r\n\r\n")

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Garbled) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            engine = engine_for(f"http://127.0.0.1:{server.server_address[1]}/v1", api_key_env="DRIFT_TEST_API_KEY", max_retries=1)
            with pytest.raises(OpenAIServerError) as caught:
                engine.generate([CONVERSATION], SamplingParams(), 1)
        finally:
            server.shutdown()
    assert len(requests) == 2 and "2 attempts" in str(caught.value) and engine.url in str(caught.value)
    # aiohttp's own errors carry the request's headers: raised as they are, they would show the key.
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value) + str(vars(caught.value))
    assert secret not in shown
    pickle.loads(pickle.dumps(caught.value))  # as Ray hands an actor's error to the driver


def test_a_server_that_hides_which_stop_it_hit_gets_no_stop_and_is_cut_here():
    async def like_openai(body, headers):
        # Stripped stop string, no stop_reason: "stop" could be the stop string or the end of turn.
        if "stop" in body:
            return completion(choice("<answer>4"), prompt_tokens=7, completion_tokens=3)
        return completion(choice("<answer>4</answer> because 2+2=4"), prompt_tokens=7, completion_tokens=12)

    with FakeServer(like_openai) as server:
        engine = engine_for(server.api_base)
        [[reply]] = engine.generate([CONVERSATION], SamplingParams(), 1)
        # Both requests count: the server generated and was billed for both.
        assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ("<answer>4</answer>", 14, 15)
        assert [("stop" in r) for r in server.requests] == [True, False]
        assert engine.stop_on_server is False
        engine.generate([CONVERSATION], SamplingParams(), 1)
    assert len(server.requests) == 3 and "stop" not in server.requests[2]


def held_until(count: int, then_s: float = 0.0):
    """A server handler that holds each request until `count` have come (10 s at most), then `then_s` more:
    a fixed delay alone would let a busy machine answer the first requests before the last ones come."""
    arrived, all_arrived = 0, asyncio.Event()

    async def handler(body, headers):
        nonlocal arrived
        arrived += 1
        if arrived == count:
            all_arrived.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(all_arrived.wait(), timeout=10)
        await asyncio.sleep(then_s)
        return completion(choice("x"))

    return handler


def test_requests_in_flight_are_bounded_by_max_concurrency():
    with FakeServer(held_until(2, then_s=0.1)) as server:  # 0.1 s for requests beyond the bound to come
        results = engine_for(server.api_base, max_concurrency=2).generate([CONVERSATION] * 6, SamplingParams(stop=()), 1)
    assert len(results) == 6 and len(server.requests) == 6
    assert server.most_in_flight == 2


def test_more_requests_than_aiohttp_connects_at_once_are_in_flight_together():
    with FakeServer(held_until(150)) as server:
        engine_for(server.api_base, max_concurrency=150).generate([CONVERSATION] * 150, SamplingParams(stop=()), 1)
    assert server.most_in_flight == 150  # aiohttp's default connection limit held them to 100


def test_reasoning_returned_apart_is_warned_about_once(caplog):
    async def with_reasoning_parser(body, headers):
        reply = choice("<answer>4</answer>")
        reply["message"]["reasoning_content"] = "2+2 is 4"
        return completion(reply)

    with FakeServer(with_reasoning_parser) as server:
        engine = engine_for(server.api_base)
        with caplog.at_level(logging.WARNING, logger="drift_ray.openai_engine"):
            replies = engine.generate([CONVERSATION] * 2, SamplingParams(), 1) + engine.generate([CONVERSATION], SamplingParams(), 1)
    assert [group[0].text for group in replies] == ["<answer>4</answer>"] * 3
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "'reasoning_content'" in warnings[0] and "without a reasoning parser" in warnings[0]


def test_build_engine_makes_the_openai_engine_from_the_rollout_config(monkeypatch):
    monkeypatch.setenv("DRIFT_TEST_API_KEY", "sk-do-not-show")
    cfg = RolloutConfig(
        engine="openai", model="served-name", api_base="http://127.0.0.1:9/v1/", api_key_env="DRIFT_TEST_API_KEY"
    )
    engine = build_engine(cfg)
    assert cfg.engine is EngineKind.openai and isinstance(engine, OpenAIEngine)
    assert (engine.name, engine.url) == ("served-name", "http://127.0.0.1:9/v1/chat/completions")
    assert "sk-do-not-show" not in repr(engine)
    with pytest.raises(ValueError, match="n=0"):
        engine.generate([CONVERSATION], SamplingParams(), 0)
