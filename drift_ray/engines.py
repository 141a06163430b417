"""Generation engines behind the `Engine` protocol: transformers (CPU default) and vLLM (GPU).

Both take conversations, apply the model's chat template, and return n sampled assistant replies per
conversation. A reply ends at the end-of-turn token (excluded from the text) or just after the first
stop string (included, like vLLM's `include_stop_str_in_output`). Engines know nothing of DRIFT.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.generation.logits_process import TopPLogitsWarper

from drift_ray.config import EngineKind, RolloutConfig
from drift_ray.episode import Conversation, Engine, Generation, SamplingParams

DEMO_MODEL = "builtin:demo"
# Chat models whose config names only the end-of-text eos still end a turn with one of these.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>")


class TransformersEngine:
    """Batched sampling with the KV cache on any causal LM that `from_pretrained` loads.

    Each prompt is prefilled once; its KV cache is then repeated for the n samples. Rows that finish
    leave the batch, so a long reply does not keep the finished ones computing. Prompts are sorted by
    length and decoded in chunks of at most `max_batch_tokens` (rows × (prompt + new tokens)) to bound
    memory and padding. `torch_threads` sets torch's (process-wide) CPU thread count.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        torch_threads: int | None = None,
        max_batch_tokens: int = 1 << 16,
    ):
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.name = model
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        self.end_of_turn_ids = _end_of_turn_ids(self.tokenizer, self.model)
        if not self.end_of_turn_ids:
            raise ValueError(f"{model}: found no end-of-turn token (eos_token_id, {', '.join(_END_OF_TURN_TOKENS)})")
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else min(self.end_of_turn_ids)

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, n: int) -> list[list[Generation]]:
        if n < 1:
            raise ValueError(f"{self.name}: asked for n={n} replies per conversation; expected n >= 1")
        if not conversations:
            return []
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        prompts: list[list[int]] = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        results: list[list[Generation]] = [[] for _ in prompts]
        for chunk in self._chunks(prompts, n, params.max_new_tokens):
            samples = self._sample([prompts[i] for i in chunk], params, n, generator)
            for row, completion in enumerate(samples):
                index = chunk[row // n]
                results[index].append(self._to_generation(completion, len(prompts[index]), params.stop))
        return results

    def _chunks(self, prompts: list[list[int]], n: int, max_new_tokens: int) -> list[list[int]]:
        """Prompt indices, shortest first, in groups whose batch (n rows per prompt, each as long as the
        longest prompt plus max_new_tokens) holds at most max_batch_tokens; a prompt over it goes alone."""
        chunks: list[list[int]] = []
        for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
            # Sorted ascending, so prompt i is the longest of the chunk it would join.
            cost = n * (len(prompts[i]) + max_new_tokens)
            if chunks and (len(chunks[-1]) + 1) * cost <= self.max_batch_tokens:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    @torch.inference_mode()
    def _sample(
        self, prompts: list[list[int]], params: SamplingParams, n: int, generator: torch.Generator | None
    ) -> list[list[int]]:
        """n completions (token ids) of every prompt, in order: prompt 0's n samples, then prompt 1's, …"""
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        next_position = positions[:, -1:].repeat_interleave(n, dim=0) + 1

        stopper = _StopStrings(self.tokenizer, params.stop)
        top_p = TopPLogitsWarper(params.top_p) if 0 < params.top_p < 1 else None
        completions: list[list[int]] = [[] for _ in range(len(prompts) * n)]
        live = list(range(len(completions)))  # the completion each batch row is writing
        for step in range(params.max_new_tokens):
            tokens = _pick(logits, params.temperature, top_p, generator)
            keep = []
            for row, token in enumerate(tokens.tolist()):
                completion = completions[live[row]]
                completion.append(token)
                if token not in self.end_of_turn_ids and not stopper.hit(completion):
                    keep.append(row)
            if not keep or step + 1 == params.max_new_tokens:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                tokens, attention_mask, next_position = tokens[index], attention_mask[index], next_position[index]
                live = [live[row] for row in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
            logits = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_position,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_position = next_position + 1
        return completions

    def _to_generation(self, completion: list[int], prompt_tokens: int, stop: Sequence[str]) -> Generation:
        body = completion[:-1] if completion and completion[-1] in self.end_of_turn_ids else completion
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        return Generation(cut_at_stop(text, stop), prompt_tokens, len(completion))


def _pick(logits: torch.Tensor, temperature: float, top_p: TopPLogitsWarper | None, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row: argmax at temperature 0, else a sample (after top-p filtering)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_p is not None:
        scores = top_p(None, scores)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class _StopStrings:
    """Tells whether a growing completion has just produced one of the stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # A token decodes to at least one character (bar partial bytes), so this many trailing tokens
        # cover the longest stop string; a stop found earlier would already have ended the completion.
        self.tail = max(map(len, self.stop), default=0) + 1

    def hit(self, completion: list[int]) -> bool:
        if not self.stop:
            return False
        text = self.tokenizer.decode(completion[-self.tail :], skip_special_tokens=True)
        return any(s in text for s in self.stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to and including the earliest-ending stop string; unchanged when none occurs."""
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


def _end_of_turn_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    special = tokenizer.added_tokens_encoder
    ids.update(special[t] for t in _END_OF_TURN_TOKENS if t in special)
    return ids


class VLLMEngine:
    """vLLM's offline `LLM.chat`; `n` samples per conversation share the prompt's prefill."""

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
    ):
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "rollout.engine: 'vllm' needs the vllm package (pip install 'drift-ray[vllm]' on a GPU machine)"
            ) from err
        self._vllm = vllm
        self.name = model
        self.llm = vllm.LLM(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
        )

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, n: int) -> list[list[Generation]]:
        sampling = self._vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop),
            include_stop_str_in_output=True,
            seed=params.seed,
        )
        outputs = self.llm.chat(list(conversations), sampling, use_tqdm=False)
        return [
            [Generation(o.text, len(request.prompt_token_ids), len(o.token_ids)) for o in request.outputs]
            for request in outputs
        ]


def build_engine(cfg: RolloutConfig, model: str | None = None) -> Engine:
    """The engine `cfg.engine` names, loading `model` (default: cfg.model)."""
    model = model or cfg.model
    if model == DEMO_MODEL:
        raise ValueError(
            f"rollout.model: {DEMO_MODEL!r} is not a model path; resolve it first with "
            "drift_ray.demo_model.ensure_demo_model(cache_dir) and pass the returned directory"
        )
    if cfg.engine is EngineKind.transformers:
        return TransformersEngine(model, dtype=cfg.dtype, torch_threads=cfg.torch_threads)
    if cfg.engine is EngineKind.vllm:
        return VLLMEngine(
            model,
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
    raise ValueError(f"rollout.engine: unknown engine {cfg.engine!r}; expected one of {[k.value for k in EngineKind]}")
