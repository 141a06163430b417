"""Weighted SFT, the pure core: examples, batches, the weighted loss and a plain training loop.

A trajectory becomes one example: its messages rendered with the model's chat template, the assistant
reply supervised and everything else masked (label -100). Sample i costs L_i, the mean token NLL over
its supervised tokens; a batch costs Σ w_i·L_i / normalizer with the normalizer taken over the GLOBAL
batch (`loss_normalizer`), so splitting the global batch into micro-batches and data-parallel ranks
leaves the gradient unchanged.

`fit_plain` is a single-process loop over these pieces: it pre-trains the tiny demo model and is the
baseline of the benchmarks. The distributed loop (Ray Train + DeepSpeed) calls the same functions.
No Ray and no DeepSpeed here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from drift_ray import schema
from drift_ray.config import ExampleKind, LossKind, LrSchedule

IGNORE_INDEX = -100  # label of a position that is not supervised (the cross-entropy ignore index)

Message = dict[str, str]


@dataclass
class TokenizedExample:
    """One training sequence; `labels` equals `input_ids` where supervised and IGNORE_INDEX elsewhere.
    `cut_tokens`: how many tokens were dropped to fit max_length."""

    input_ids: list[int]
    labels: list[int]
    cut_tokens: int = 0


def tokenize_trajectory(
    tokenizer: Any,
    messages: Sequence[Message],
    kind: ExampleKind | str,
    max_length: int,
    cut_off: Sequence[bool | None] | None = None,
) -> TokenizedExample:
    """Render a conversation with the tokenizer's chat template and mask everything but the assistant reply.

    last_turn: the last assistant message given all earlier messages (the paper's example).
    all_turns: the whole conversation as one sequence, every assistant message supervised.
    Messages after the last assistant message are dropped: nothing after them is supervised.

    A reply is supervised after the generation prompt as the policy wrote it: its content, then what the
    template writes after an assistant message's content, the end-of-turn token (e.g. <|im_end|>) and
    whatever follows it (ChatML's trailing newline). All of that is supervised (unless the reply was cut
    off, below): generation stops at the end-of-turn token, so the trailing text is never asked of the
    model, and the rule needs no knowledge of which token ends a turn. The last reply is taken so even where
    the template writes the message otherwise (templates that drop its <think> reasoning, or whose
    generation prompt opens it); a reply that later messages follow (all_turns) is what the template writes
    for it, as the later contexts hold it, and needs the renderings to extend one another. Each piece (a
    context, then a reply) takes the tokens that the whole text so far gets after the tokens before it, as
    the engine tokenizes a prompt whole and the model continues it: a SentencePiece tokenizer's word-start
    marker goes to the reply's first word, not to a token of its own. Where a token would merge across the
    boundary (which generation cannot produce), the piece is tokenized alone. Either way the mask boundary
    falls between the two pieces' tokens.

    `cut_off` (schema.CUT_OFF): one flag per assistant message, None where not known (taken as False). A
    reply cut off at max_new_tokens never ended: what the template writes after its content is not
    supervised, for the last reply not written at all, so the model is not taught to end a turn mid-reply.
    One without text (special tokens alone, or whitespace that the template trims) supervises nothing, so
    an example may hold no supervised token: per_sample_nll gives it 0.

    Longer than `max_length`: the oldest turns after the question are dropped whole, an answer with the
    feedback on it, until the example fits or only the last answer and its feedback are left. The system
    prompt and the question stay, since a reply makes sense only given the question, and the roles still
    alternate, as some templates require. Still too long: tokens are dropped from the left, keeping the last
    reply whole. A last reply that alone does not fit is cut on the right, after the one context token that
    lets its first token be predicted, so at least one supervised token always remains (unless the last reply
    was cut off without text). `cut_tokens` counts the tokens dropped either way.
    """
    kind = ExampleKind(kind)
    messages = list(messages)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 so one token can be predicted, found {max_length}")
    roles = [message["role"] for message in messages]
    assistant_turns = [i for i, role in enumerate(roles) if role == "assistant"]
    if not assistant_turns:
        raise ValueError(f"a training conversation needs an assistant message to supervise; found roles {roles}")
    if cut_off is not None and len(cut_off) != len(assistant_turns):
        raise ValueError(schema.per_reply_mismatch(schema.CUT_OFF, len(cut_off), len(assistant_turns)))
    cut_turns = {turn for turn, cut in zip(assistant_turns, cut_off or ()) if cut}
    input_ids, labels, reply_start = _tokenize(tokenizer, messages, kind, assistant_turns, cut_turns)
    whole_length = len(input_ids)
    if whole_length <= max_length:
        return TokenizedExample(input_ids, labels)
    after_question = roles.index("user") + 1 if "user" in roles else len(messages)
    for first_kept in (turn for turn in assistant_turns[:-1] if turn > after_question):
        input_ids, labels, reply_start = _tokenize(
            tokenizer,
            messages[:after_question] + messages[first_kept:],
            kind,
            _after_dropping(assistant_turns, after_question, first_kept),
            set(_after_dropping(cut_turns, after_question, first_kept)),
        )
        if len(input_ids) <= max_length:
            return TokenizedExample(input_ids, labels, whole_length - len(input_ids))
    start = max(0, min(len(input_ids) - max_length, reply_start - 1))
    return TokenizedExample(
        input_ids[start : start + max_length], labels[start : start + max_length], whole_length - max_length
    )


def _after_dropping(turns: Iterable[int], start: int, stop: int) -> list[int]:
    """The message indices `turns` once messages[start:stop] are dropped."""
    return [turn if turn < start else turn - (stop - start) for turn in turns if not start <= turn < stop]


def _tokenize(
    tokenizer: Any, messages: list[Message], kind: ExampleKind, assistant_turns: list[int], cut_turns: set[int]
) -> tuple[list[int], list[int], int]:
    """tokenize_trajectory's example before truncation, and where its last reply starts."""
    supervised_turns = assistant_turns if kind is ExampleKind.all_turns else assistant_turns[-1:]

    input_ids: list[int] = []
    labels: list[int] = []
    rendered, rendered_ids = "", []  # the text so far, and its tokens as one text
    reply_start = 0
    for turn in supervised_turns:
        history = messages[:turn]
        context = _render(tokenizer, history, add_generation_prompt=True)
        _require_prefix(tokenizer, rendered, context, f"messages[:{turn}] with the generation prompt")
        if turn == supervised_turns[-1]:
            full = context + messages[turn]["content"]
            if turn not in cut_turns:
                full += _after_reply(tokenizer, history)
            reply = full
        else:
            full = _render(tokenizer, messages[: turn + 1], add_generation_prompt=False)
            _require_prefix(tokenizer, context, full, f"messages[:{turn + 1}]")
            reply = _without_end(tokenizer, history, full) if turn in cut_turns else full
        context_ids, context_whole_ids = _continuation(tokenizer, rendered, rendered_ids, context)
        reply_ids, rendered_ids = _continuation(tokenizer, context, context_whole_ids, reply)
        end_ids: list[int] = []
        if reply != full:
            end_ids, rendered_ids = _continuation(tokenizer, reply, rendered_ids, full)
        if not reply_ids and turn not in cut_turns:
            raise ValueError(
                f"{_name(tokenizer)}: the chat template renders message {turn + 1} (an assistant reply; counted from 1) "
                "as no tokens at all; expected at least its end-of-turn token"
            )
        input_ids += context_ids
        labels += [IGNORE_INDEX] * len(context_ids)
        reply_start = len(input_ids)
        input_ids += reply_ids + end_ids
        labels += reply_ids + [IGNORE_INDEX] * len(end_ids)
        rendered = full
    return input_ids, labels, reply_start


# Private-use characters: no chat template writes them of its own, or has a reason to rewrite them.
_REPLY_MARK = "\ue000drift-ray reply\ue000"


def _after_reply(tokenizer: Any, history: list[Message]) -> str:
    """What the chat template writes after the content of an assistant message that follows `history`."""
    rendered = _render(tokenizer, [*history, {"role": "assistant", "content": _REPLY_MARK}], add_generation_prompt=False)
    at = rendered.rfind(_REPLY_MARK)
    if at < 0:
        raise ValueError(
            f"{_name(tokenizer)}: the chat template does not write the content of the assistant message after "
            f"messages[:{len(history)}], so where a reply ends cannot be told"
        )
    return rendered[at + len(_REPLY_MARK) :]


def _without_end(tokenizer: Any, history: list[Message], rendered: str) -> str:
    """`rendered` (the template's text of history plus an assistant message) without what the template
    writes after the message's content."""
    after = _after_reply(tokenizer, history)
    if not rendered.endswith(after):
        raise ValueError(
            f"{_name(tokenizer)}: the chat template ends message {len(history) + 1} (an assistant reply; counted from 1) "
            f"otherwise than its rendering of a lone reply ({after!r}), so the end of that reply, cut off at "
            "max_new_tokens, cannot be left unsupervised. Use train.examples=last_turn."
        )
    return rendered[: len(rendered) - len(after)]


def _render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    # tokenize=False: with tokenize=True transformers 5 returns a BatchEncoding rather than a list.
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _continuation(tokenizer: Any, prefix: str, prefix_ids: list[int], text: str) -> tuple[list[int], list[int]]:
    """The tokens of what `text` adds to `prefix` (whose tokens as one text are `prefix_ids`), and the
    tokens of `text` as one text: the latter after `prefix_ids` where they begin with them, else the
    addition tokenized alone."""
    whole = _encode(tokenizer, text)
    if whole[: len(prefix_ids)] == prefix_ids:
        return whole[len(prefix_ids) :], whole
    return _encode(tokenizer, text[len(prefix) :]), whole


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _require_prefix(tokenizer: Any, prefix: str, text: str, what: str) -> None:
    """Only all_turns can fail it: a last_turn example extends nothing but its own context."""
    if text.startswith(prefix):
        return
    at = next((i for i, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
    raise ValueError(
        f"{_name(tokenizer)}: the chat template is not prefix-stable: rendering {what} does not extend the "
        f"rendering of the messages before it (at character {at}: expected {prefix[at : at + 40]!r}, "
        f"found {text[at : at + 40]!r}). Weighted SFT needs each rendering to extend the previous one to "
        "mask the assistant replies exactly. Use train.examples=last_turn."
    )


def collate(
    examples: Sequence[TokenizedExample],
    weights: Sequence[float],
    pad_token_id: int,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and labels (IGNORE_INDEX on padding) [B, T]; weights [B].
    On `device` when given, else on the CPU."""
    if len(weights) != len(examples):
        raise ValueError(f"collate got {len(examples)} examples but {len(weights)} weights; expected one per example")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "weights": torch.tensor(list(weights), dtype=torch.float32),
    }
    return batch if device is None else {name: tensor.to(device) for name, tensor in batch.items()}


def length_buckets(
    lengths: Sequence[int], batch_size: int, seed: int | Sequence[int], *, batches_per_chunk: int = 16
) -> list[list[int]]:
    """Batches of indices of similar length, in random order; the same for the same seed.

    The indices are shuffled, cut into chunks of `batches_per_chunk` batches, sorted by length within
    each chunk and cut into batches; the batches are then shuffled. Sorting only within chunks keeps the
    batches random while cutting most of the padding. One batch, anywhere in the order, may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, found {batch_size}")
    rng = np.random.default_rng(seed)
    lengths_array = np.asarray(lengths)
    order = rng.permutation(len(lengths_array))
    chunk_size = batch_size * batches_per_chunk
    batches = []
    for chunk_start in range(0, len(order), chunk_size):
        chunk = order[chunk_start : chunk_start + chunk_size]
        chunk = chunk[np.argsort(lengths_array[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def global_batches(
    lengths: Sequence[int], batch_size: int, seed: int | Sequence[int], loss: LossKind | str
) -> list[list[int]]:
    """One epoch's global batches for a loss kind: of similar length (`length_buckets`) for sample_mean,
    random for weight_normalized.

    weight_normalized divides each batch by its own Σ w, and a trajectory's length follows its weight (a
    failure plays every turn, a first-turn success one): a batch of long failures, each weighing nearly 0,
    would be divided by its tiny Σ w and trained on as plain SFT. sample_mean divides every batch by its
    size, so how batches are made does not change what an example weighs.
    """
    if LossKind(loss) is LossKind.sample_mean:
        return length_buckets(lengths, batch_size, seed)
    return length_buckets(lengths, batch_size, seed, batches_per_chunk=1)  # each batch sorted alone: random


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_i [B]: mean token NLL over each sample's supervised tokens, in float32.

    logits[:, t] predicts labels[:, t + 1]. A sample without supervised tokens gets 0 (and no gradient);
    `tokenize_trajectory` makes one only of replies cut off before they wrote any text.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    # Only supervised positions go to float32: the full [B, T, V] logits in float32 would cost gigabytes
    # for a 150k vocabulary, and the reply is a small part of the sequence.
    token_nll = F.cross_entropy(
        logits[:, :-1][supervised].float(), targets[supervised], reduction="none"
    )
    rows = supervised.nonzero(as_tuple=True)[0]
    totals = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, token_nll)
    return totals / supervised.sum(dim=1).clamp(min=1)


def loss_normalizer(weights_of_global_batch: Sequence[float], kind: LossKind | str) -> float:
    """The divisor of Σ w_i·L_i that makes the loss of the global batch (all micro-batches, all ranks).

    sample_mean: the number of samples (the loss is the mean of w_i·L_i, the authors' default);
    weight_normalized: Σ w_i (the loss is the w-weighted mean of L_i). A global batch whose weights are
    all zero gets 1: its loss is 0 and it moves nothing.

    Because the normalizer is global, the micro-batch losses `weighted_loss(...)` of every micro-batch on
    every rank SUM to the global loss, and their gradients sum to its gradient. What a caller must do:
    - gradient accumulation: call backward on each micro-batch loss as it is (gradients add up);
    - data parallelism: DDP and DeepSpeed AVERAGE gradients over the W ranks, so each rank backpropagates
      `weighted_loss(...) * W`;
    - DeepSpeed also divides by gradient_accumulation_steps inside `engine.backward` unless told not
      to: call `engine.backward(weighted_loss(...) * world_size, scale_wrt_gas=False)`.
    Each rank runs only its share of the step: sample_mean needs the global batch size, weight_normalized
    Σ w over all ranks' micro-batches; both are known to every rank that holds the plan of the step (see
    train.plan_steps), else Σ w takes one all-reduce of a scalar per step.
    """
    kind = LossKind(kind)
    weights = [float(w) for w in weights_of_global_batch]
    if not weights:
        raise ValueError("loss_normalizer got an empty global batch; expected at least one weight")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"importance weights must be finite and non-negative; found {bad[:5]}")
    if kind is LossKind.sample_mean:
        return float(len(weights))
    total = math.fsum(weights)
    return total if total > 0 else 1.0


def weighted_loss(nll: torch.Tensor, weights: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Σ_i w_i·L_i / normalizer over this micro-batch; the loss kind lives in `loss_normalizer`."""
    return (weights.to(nll.dtype) * nll).sum() / normalizer


def padding_token_id(tokenizer: Any) -> int:
    """The id that collate pads with: the pad token's, else the EOS token's (padding is masked anyway)."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError(f"{_name(tokenizer)}: the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad_token_id


def lr_lambda(step: int, total_steps: int, warmup_ratio: float, schedule: LrSchedule | str) -> float:
    """Learning-rate multiplier before optimizer step `step` (0-based) of `total_steps`.

    Linear warmup over ceil(warmup_ratio·total_steps) steps (at most total_steps − 1, so that a short run
    still reaches the peak), from 1/(warmup+1) so that no step is wasted at 0, up to 1; then constant 1,
    or a cosine that reaches 0 at step == total_steps.
    """
    schedule = LrSchedule(schedule)
    if total_steps < 1 or not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(
            f"lr_lambda needs total_steps >= 1 and 0 <= warmup_ratio < 1; found {total_steps} and {warmup_ratio}"
        )
    warmup_steps = min(math.ceil(warmup_ratio * total_steps), total_steps - 1)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule is LrSchedule.constant:
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def fit_plain(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    weights: Sequence[float] | None,
    *,
    kind: ExampleKind | str,
    loss: LossKind | str,
    lr: float,
    epochs: int,
    batch_size: int,
    max_length: int,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    warmup_ratio: float = 0.0,
    schedule: LrSchedule | str = LrSchedule.constant,
    seed: int = 0,
    log_every: int = 0,
) -> dict[str, float]:
    """Weighted SFT in one process: AdamW, `global_batches` of `loss`, one optimizer step per batch.

    `weights` None means 1 for every conversation. Conversations of weight 0 are left out, as the
    distributed loop leaves them out (train.train_weighted_sft). Deterministic for a seed on CPU.
    Returns steps, tokens (non-padding tokens seen), initial_loss (the first step's), final_loss (mean
    over the last epoch's steps), seconds and tokens_per_s.
    """
    weights = [1.0] * len(conversations) if weights is None else [float(w) for w in weights]
    if len(weights) != len(conversations) or epochs < 1:
        raise ValueError(
            f"fit_plain needs one weight per conversation and epochs >= 1; "
            f"found {len(conversations)} conversations, {len(weights)} weights and epochs={epochs}"
        )
    invalid = [(i, w) for i, w in enumerate(weights) if not (math.isfinite(w) and w >= 0)]
    if invalid:
        raise ValueError(f"fit_plain: weights must be finite and >= 0; found {invalid[0][1]} at conversation {invalid[0][0]}")
    conversations, weights = [c for c, w in zip(conversations, weights) if w > 0], [w for w in weights if w > 0]
    if not conversations:
        raise ValueError("fit_plain needs at least one conversation with a positive weight; found none")
    pad_token_id = padding_token_id(tokenizer)
    torch.manual_seed(seed)
    examples = [tokenize_trajectory(tokenizer, messages, kind, max_length) for messages in conversations]
    lengths = [len(example.input_ids) for example in examples]
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, total_steps, warmup_ratio, schedule)
    )
    device = next(model.parameters()).device
    model.train()

    step = tokens = 0
    step_losses: list[float] = []
    started = time.perf_counter()
    for epoch in range(epochs):
        for indices in global_batches(lengths, batch_size, (seed, epoch), loss):
            batch_weights = [weights[i] for i in indices]
            batch = collate([examples[i] for i in indices], batch_weights, pad_token_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll = per_sample_nll(logits, batch["labels"])
            batch_loss = weighted_loss(nll, batch["weights"], loss_normalizer(batch_weights, loss))
            lr = scheduler.get_last_lr()[0]  # this step's: the scheduler moves on after it
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            tokens += int(batch["attention_mask"].sum())
            step_losses.append(batch_loss.item())
            if log_every and step % log_every == 0:
                elapsed = time.perf_counter() - started
                print(
                    f"step {step}/{total_steps} epoch {epoch + 1} loss {step_losses[-1]:.4f} "
                    f"lr {lr:.2e} {tokens / elapsed:.0f} tokens/s",
                    flush=True,
                )
    seconds = time.perf_counter() - started
    return {
        "steps": step,
        "tokens": tokens,
        "initial_loss": step_losses[0],
        "final_loss": float(np.mean(step_losses[-steps_per_epoch:])),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }
