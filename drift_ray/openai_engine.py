"""An engine for any server that speaks OpenAI's /v1/chat/completions: vLLM serve, SGLang, TGI,
`transformers serve`, hosted APIs.

The sync `generate` runs one asyncio loop per call and sends every request of the batch at once, at most
`max_concurrency` in flight. A request that meets a connection error, HTTP 408, 429 or 5xx is sent again
after an exponential backoff (jittered, so that actors do not retry in lockstep; at least the server's
Retry-After). A request that outlives `request_timeout_s` is not retried: the server is still busy with it,
and a copy would only add to its load.

Servers differ in two ways that matter here; the engine learns each from the replies and remembers it:
- `n`: vLLM and SGLang return n choices for one request, sharing the prompt's prefill; other servers reject
  n > 1 (HTTP 400/422) or return fewer choices. The engine then asks for each missing sample in a request
  of its own, with the seed that choice would have had (episode.sample_seed), and from then on sends one
  request per sample.
- stop strings: like the other engines, a reply that stopped on a stop string ends with it. A reply is
  resolved in this order. It holds a stop string (transformers serve and TGI keep it): cut just after the
  earliest one, and note that this server keeps them. The choice names the stop it matched (vLLM
  `stop_reason`, SGLang `matched_stop`; null or a token id when the reply ended on its end-of-turn token):
  append that string. The server says finish_reason "stop" and nothing more: from a server seen keeping
  stop strings, the reply ended on its end of turn; from any other (OpenAI's hosted API strips the stop
  string and names none) a stop string and an end of turn look the same, so the request is sent again
  without `stop`, the reply is cut here after its first stop string, and the engine never sends `stop` to
  this server again. The token counts of such replies include what the server generated past the stop,
  and the tokens of the request that was sent again.

Token counts come from the response's `usage` (0 when a server reports none). A request for n choices
reports only their sum, which is shared among the choices in proportion to their length.

A server that returns a reply's reasoning apart from its content (vLLM's or SGLang's reasoning parser) is
warned about once: the replies are stored without it, right for a hosted reasoning API, which takes the
conversation back so, but not for rollouts to train on.

The API key is read from the environment variable named by `api_key_env` (surrounding whitespace dropped)
and sent as a bearer token. It never appears in a repr or an error message; a server that echoes it back
has it replaced by '***'. A name that is not upper case (as rollout.api_key_env requires) is refused, as it
may be the key itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import random
from typing import Any, Awaitable, Callable, Sequence

import aiohttp

from drift_ray.config import API_KEY_ENV_EXPECTED, is_env_var_name
from drift_ray.engines import cut_at_stop, ends_on_stop
from drift_ray.episode import Conversation, EngineServerError, Generation, SamplingParams, sample_seed

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 60.0
_ERROR_BODY_CHARS = 500
# Keys that vLLM and SGLang add to a choice: the stop string that ended it, or null / a token id.
_MATCHED_STOP_KEYS = ("stop_reason", "matched_stop")
# The finish_reason of a reply that the server cut short: max_tokens reached, or a hosted API's filter.
_CUT_SHORT = ("length", "content_filter")
# Where a server with a reasoning parser puts the text it took out of a reply.
_REASONING_KEYS = ("reasoning_content", "reasoning")
# How servers that cannot return n choices refuse a request for them.
_REJECTED_STATUSES = (400, 422)

Post = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class OpenAIServerError(EngineServerError):
    """A chat-completions request failed. The message names the URL and the HTTP status, never the API key."""

    def __init__(self, message: str, *, url: str, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status

    def __reduce__(self):
        # Ray sends an actor's error to the driver pickled; the default unpickling calls type(self)(*args),
        # which fails without the keyword-only url.
        return functools.partial(type(self), url=self.url, status=self.status), self.args, self.__dict__


class OpenAIEngine:
    """n chat completions per conversation from the server at `api_base` (the URL up to and including /v1)
    for the model it serves as `model`."""

    def __init__(
        self,
        model: str,
        *,
        api_base: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 32,
        request_timeout_s: float = 600.0,
        max_retries: int = 5,
        retry_backoff_s: float = 1.0,
    ):
        if max_concurrency < 1:
            raise ValueError(f"rollout.max_concurrency: found {max_concurrency}; expected at least 1")
        # Checked here too, for an engine made in code: the repr and the HTTP 401/403 error show the name,
        # and a key given for it would be shown with them.
        if not is_env_var_name(api_key_env):
            raise ValueError(f"rollout.api_key_env: {API_KEY_ENV_EXPECTED}")
        self.name = model
        self.url = f"{api_base.rstrip('/')}/chat/completions"
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        # Stripped: HTTP drops a trailing space from the header, and a server that echoes the key would then
        # show it unredacted; a trailing newline (from a .env file) is not allowed in a header at all.
        self._api_key = (os.environ.get(api_key_env) or "").strip() or None
        # What the server was seen to do; each changes once, for good, on evidence.
        self.n_per_request = True
        self.stop_on_server = True
        self.stop_kept_in_text = False
        self.reasoning_apart = False
        self.retried = False  # whether a retry was reported

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.name!r}, url={self.url!r}, api_key_env={self.api_key_env!r})"

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, n: int) -> list[list[Generation]]:
        if n < 1:
            raise ValueError(f"{self.name}: asked for n={n} replies per conversation; expected n >= 1")
        if not conversations:
            return []
        return asyncio.run(self._generate(conversations, params, n))

    async def _generate(self, conversations: Sequence[Conversation], params: SamplingParams, n: int) -> list[list[Generation]]:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        # The semaphore caps the requests in flight: aiohttp's own cap of 100 connections would hold the rest
        # in a queue whose wait counts against their timeout.
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
            post = functools.partial(self._post, session, asyncio.Semaphore(self.max_concurrency))
            return list(await asyncio.gather(*(self._samples(post, c, params, n, i) for i, c in enumerate(conversations))))

    async def _samples(
        self, post: Post, conversation: Conversation, params: SamplingParams, n: int, index: int
    ) -> list[Generation]:
        """n replies to the `index`-th conversation: in one request while the server returns n choices, else one
        request each."""
        replies: list[Generation] = []
        if n > 1 and self.n_per_request:
            try:
                replies = await self._request(post, conversation, params, n, sample_seed(params.seed, index, 0, n))
            except OpenAIServerError as err:
                # A refusal for another reason (a prompt too long) fails again below, in the single requests,
                # and is raised there.
                if err.status not in _REJECTED_STATUSES:
                    raise
        singles = await asyncio.gather(
            *(
                self._request(post, conversation, params, 1, sample_seed(params.seed, index, j, n))
                for j in range(len(replies), n)
            )
        )
        if singles and n > 1:  # only once they went through: else the refusal was not about n
            self.n_per_request = False
        return replies[:n] + [single[0] for single in singles]

    async def _request(
        self, post: Post, conversation: Conversation, params: SamplingParams, n: int, seed: int | None
    ) -> list[Generation]:
        stop = [s for s in params.stop if s]
        payload: dict[str, Any] = {
            "model": self.name,
            "messages": list(conversation),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
        }
        if n > 1:
            payload["n"] = n
        if seed is not None:
            payload["seed"] = seed
        stop_on_server = bool(stop) and self.stop_on_server
        if stop_on_server:
            payload["stop"] = stop
        choices, usage = self._choices(await post(payload))
        usages = [usage]
        texts = self._texts(choices, stop, stop_on_server)
        if texts is None:
            self.stop_on_server = False
            del payload["stop"]
            choices, usage = self._choices(await post(payload))
            usages.append(usage)
            texts = self._texts(choices, stop, False)
            assert texts is not None  # without `stop` sent, every reply is cut here
        # The server spent the tokens of a request that had to be sent again too.
        prompt_tokens = sum(self._token_count(u, "prompt_tokens") for u in usages)
        completion_tokens = _share(sum(self._token_count(u, "completion_tokens") for u in usages), texts)
        return [
            # finish_reason "length": max_tokens reached, unless the reply was cut here at a stop string. Some
            # vLLM releases also say "length" where the last token allowed ended the turn; without the token
            # ids, which a server does not return, such a reply counts as cut off. "content_filter": a hosted
            # API cut the reply short, which the policy did not end either.
            Generation(text, prompt_tokens, tokens, choice.get("finish_reason") in _CUT_SHORT and not ends_on_stop(text, stop))
            for choice, text, tokens in zip(choices, texts, completion_tokens)
        ]

    def _texts(self, choices: list[dict[str, Any]], stop: list[str], stop_on_server: bool) -> list[str] | None:
        """The replies, each ending with the stop string it stopped on; None when the server leaves that unknown."""
        messages = [choice.get("message") or {} for choice in choices]
        apart = next((key for message in messages for key in _REASONING_KEYS if message.get(key)), None)
        if apart and not self.reasoning_apart:
            # Right for a hosted reasoning API, which takes the conversation back without it; wrong for
            # rollouts to train on, which would teach answers without their reasoning.
            self.reasoning_apart = True
            log.warning(
                "%s returns the reasoning of replies apart, in %r (a reasoning parser, such as vLLM's or SGLang's "
                "--reasoning-parser): replies are stored without it. Serve the model without a reasoning parser "
                "to train on its replies as it wrote them.",
                self.url,
                apart,
            )
        texts = [self._content(choice, message) for choice, message in zip(choices, messages)]
        kept = [any(s in text for s in stop) for text in texts]
        if not stop_on_server:
            return [cut_at_stop(text, stop) for text in texts]
        if any(kept):
            self.stop_kept_in_text = True
        resolved = []
        for choice, text, has_stop in zip(choices, texts, kept):
            named = [key for key in _MATCHED_STOP_KEYS if key in choice]
            if has_stop or choice.get("finish_reason") != "stop":
                resolved.append(cut_at_stop(text, stop))
            elif named:
                matched = choice[named[0]]
                resolved.append(text + matched if isinstance(matched, str) and matched in stop else text)
            elif self.stop_kept_in_text:
                resolved.append(text)  # this server keeps the stop strings: the reply ended on its end of turn
            else:
                return None
        return resolved

    def _token_count(self, usage: dict[str, Any], key: str) -> int:
        count = usage.get(key) or 0
        if isinstance(count, float) and count.is_integer():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise OpenAIServerError(f"{self.url}: usage.{key} is {count!r}; expected a whole number of tokens", url=self.url)
        return count

    def _content(self, choice: dict[str, Any], message: dict[str, Any]) -> str:
        """A reply's text: a model's refusal (OpenAI's `refusal`, beside no content) is what it said; no content
        in a reply cut short (max_tokens, a filter), or beside reasoning returned apart, is an empty reply. Any
        other reply without text is refused, as an unfinished one: graded, it would count as a format failure
        and be trained on."""
        content = message.get("content")
        if content is None and isinstance(message.get("refusal"), str):
            return message["refusal"]
        if content is None and (choice.get("finish_reason") in _CUT_SHORT or any(message.get(key) for key in _REASONING_KEYS)):
            return ""
        if not isinstance(content, str):
            found = f"a message with keys {sorted(message)}" if message else "no message"
            raise OpenAIServerError(
                f"{self.url}: a reply without text content ({found}); expected 'content' to be a string", url=self.url
            )
        return content

    def _choices(self, response: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The choices (in index order) and the usage of a chat-completion response, checked."""
        choices = response.get("choices") if isinstance(response, dict) else None
        if not choices or not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            found = sorted(response) if isinstance(response, dict) else type(response).__name__
            raise OpenAIServerError(
                f"{self.url}: expected a chat completion with a non-empty list 'choices', found {found}", url=self.url
            )
        unfinished = sorted(map(str, {c.get("finish_reason") for c in choices} - {"stop", None, *_CUT_SHORT}))
        if unfinished:
            # vLLM's and SGLang's "abort", vLLM's "error", tool calls: not a reply the policy ended, which
            # would be graded (an empty one as a format failure) and trained on as if it were.
            raise OpenAIServerError(
                f"{self.url}: a reply ended with finish_reason {unfinished[0]!r}, not 'stop' or 'length': the "
                "server did not finish it (a rerun plays the batch again)",
                url=self.url,
            )
        usage = response.get("usage") or {}
        if not isinstance(usage, dict):
            raise OpenAIServerError(f"{self.url}: 'usage' is a {type(usage).__name__}; expected an object", url=self.url)
        return sorted(choices, key=lambda c: c.get("index", 0)), usage

    async def _post(self, session: aiohttp.ClientSession, slots: asyncio.Semaphore, payload: dict[str, Any]) -> Any:
        """The JSON answer to `payload`, retried after a connection error, HTTP 408, 429 or 5xx."""
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            async with slots:
                try:
                    # A redirect is reported, not followed: its target is rollout.api_base's to name.
                    async with session.post(self.url, json=payload, allow_redirects=False) as response:
                        body = (await response.read()).decode("utf-8", errors="replace")
                        if response.status == 200:
                            return self._parse_json(body)
                        failure = self._http_error(response.status, body)
                        if response.status not in (408, 429) and response.status < 500:
                            raise failure
                        retry_after = _retry_after_s(response.headers.get("Retry-After"))
                except asyncio.TimeoutError:
                    raise OpenAIServerError(
                        f"{self.url}: no answer within {self.request_timeout_s:g} s (rollout.request_timeout_s); "
                        "raise it for long generations or a busy server",
                        url=self.url,
                    ) from None
                except aiohttp.ClientError as err:
                    # A connection error, a broken body or a garbled answer, retried. Never raised as it is: its
                    # request_info holds the request's headers, the API key among them.
                    failure = OpenAIServerError(f"{self.url}: {type(err).__name__}: {self._redact(str(err))}", url=self.url)
            if attempt < self.max_retries:
                if not self.retried:  # once: a busy server fails many requests at a time
                    self.retried = True
                    log.warning(
                        "%s; retrying (each request up to rollout.max_retries=%d times; later retries are not reported)",
                        failure, self.max_retries,
                    )
                backoff = min(self.retry_backoff_s * 2**attempt, _MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
                await asyncio.sleep(max(backoff, retry_after))
        raise OpenAIServerError(
            f"{failure} (gave up after {self.max_retries + 1} attempts; rollout.max_retries={self.max_retries})",
            url=self.url,
            status=failure.status,
        )

    def _parse_json(self, body: str) -> Any:
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise OpenAIServerError(
                f"{self.url} answered HTTP 200 with a body that is not JSON: {self._excerpt(body)}", url=self.url, status=200
            ) from None

    def _http_error(self, status: int, body: str) -> OpenAIServerError:
        message = f"{self.url} answered HTTP {status}: {self._excerpt(body)}"
        if status in (401, 403):
            found = "is set" if self._api_key else "is not set or empty"
            message += (
                f"; the API key comes from the environment variable {self.api_key_env} (rollout.api_key_env), which "
                f"{found} where this engine runs: on a cluster that drift-ray did not start itself, a rollout actor has "
                "the environment its node's `ray start` had, not that of the shell that ran drift-ray"
            )
        elif status == 404:
            message += "; check rollout.api_base (the server's URL up to and including /v1) and rollout.model (a model it serves)"
        elif 300 <= status < 400:
            message += "; the server redirects: set rollout.api_base to the URL it answers at"
        return OpenAIServerError(message, url=self.url, status=status)

    def _excerpt(self, text: str) -> str:
        text = self._redact(text).strip()
        return text if len(text) <= _ERROR_BODY_CHARS else f"{text[:_ERROR_BODY_CHARS]}… ({len(text)} characters)"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def _share(total: int, texts: list[str]) -> list[int]:
    """`total` tokens split among replies in proportion to their length, as integers that sum to `total`."""
    weights = [len(text) + 1 for text in texts]  # +1: every reply costs a token, if only its end of turn
    exact = [total * weight / sum(weights) for weight in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(texts)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _retry_after_s(header: str | None) -> float:
    """Seconds the server asked us to wait (Retry-After in seconds; the HTTP-date form is ignored), capped."""
    try:
        return min(max(float(header or 0), 0.0), _MAX_BACKOFF_S)
    except ValueError:
        return 0.0
