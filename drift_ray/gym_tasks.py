"""Procedural tasks from reasoning-gym (`task.kind: reasoning_gym`), checked by the generator's own scorer.

task.name: any reasoning-gym dataset name (e.g. chain_sum, leg_counting). task.options: `size` (problems
generated per split, default 500), `seed` (default: the run's seed) and any field of the generator's
config (e.g. min_terms for chain_sum); `task.num_train` / `task.num_test` then truncate.

Splits. reasoning-gym builds item i of seed s from Random(s + i), so seeds s and s + 1 share all items
but one. The train and test seeds are therefore hashed far apart from (name, seed), and train problems
whose question also appears in the test split are dropped.

Verifier `reasoning_gym`. A generator's `score_answer(answer, entry)` needs the entry's answer and
metadata (many generators check an answer against the puzzle, not a string) and a few need the
generator's config, while a verifier sees only (answer, gold). So the gold is a JSON object
{answer, dataset, config, metadata}: the verifier rebuilds the generator from (dataset, config), once
per process, and scores the answer against the stored entry. Regenerating the entry from its index
instead would not do: some generators (isomorphic_strings, knight_swap, word_ladder, ...) depend on
Python's per-process string hashing, so another process would build another puzzle. An answer is
correct when its score is at least `threshold`, default 1.0: full marks only, partial credit (say 0.5
for a right number in the wrong format) is wrong.

Some scorers run the answer as Python: `eval` (string_insertion, spiral_matrix, binary_matrix, n_queens)
or sympy (countdown, puzzle24, polynomial_multiplication, ...), which parses text by evaluating it. A
model's answer is data: for a generator whose module evals or uses sympy (and for composite, which mixes
others), an answer that could do more than arithmetic on numbers, symbols and lists scores 0 without
reaching the scorer. Read as Python tokens: a name of a builtin beyond arithmetic or of a sympy function
that runs code, called or not (`exec`, `(exec)(…)`, `open`, `chr`, `pow`, `lambda`, `sympify`, `plot…`),
a double underscore (in any Unicode form Python reads as one), attribute access (`os.system`), a power of
a power (`9**9**9`) or an exponent above 10,000. Text Python cannot tokenize cannot be evaluated and goes
to the scorer as it is. The time and memory of what remains is not bounded: `[0]*10**10` would still
fill memory (that would need the scorer in a process of its own).

Problems are generated in a process with a fixed hash seed (PYTHONHASHSEED=0; this one when it has it),
so that every process gets the same ones for a config: a resumed run, `drift-ray eval` after `drift-ray
run`, a job's driver. The scorers' dependence on hashing is met by the stored entry, as above.

Loading checks that each problem's own answer is correct through the stored gold, so a generator whose
metadata JSON cannot carry (arc_agi and rearc keep grids as tuples) is refused instead of marking every
answer wrong. Generators without a single reference answer (answer None: rubiks_cube, rush_hour, ...)
have nothing to check there.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import builtins
import contextlib
import inspect
import io
import json
import logging
import os
import re
import subprocess
import sys
import tokenize
import unicodedata
from typing import Any

from drift_ray.config import TaskConfig
from drift_ray.episode import stable_seed
from drift_ray.prompts import Problem, Task, TaskError
from drift_ray.verifiers import basic_normalize

log = logging.getLogger(__name__)

VERIFIER = "reasoning_gym"
DEFAULT_SIZE = 500

_HARMLESS_BUILTINS = {"abs", "complex", "divmod", "float", "int", "max", "min", "round", "sum", "True", "False", "None"}
_CODE_RUNNING_NAMES = ({name for name in dir(builtins) if not name.startswith("_")} - _HARMLESS_BUILTINS) | {
    "lambda", "lambdify", "sympify", "parse_expr", "S", "preview", "var", "init_printing"
}
_EVALUATES = re.compile(r"\beval\(|\bexec\(|\bsympy\b|\bsympify\b|\bparse_expr\b")
_MAX_EXPONENT = 10_000
_LAYOUT_TOKENS = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT}


@functools.lru_cache(maxsize=None)
def evaluates_answers(dataset: str) -> bool:
    """Whether the scorer of generator `dataset` may evaluate an answer: its module evals or uses sympy
    (which parses text by evaluating it); composite mixes other generators."""
    import reasoning_gym

    generator_class, _ = reasoning_gym.factory.DATASETS[dataset]
    return dataset == "composite" or _EVALUATES.search(inspect.getsource(inspect.getmodule(generator_class))) is not None


def may_run_code(answer: str) -> bool:
    """Whether evaluating `answer` as Python (or through sympy) could do more than arithmetic (see the module
    docstring); False for text Python cannot tokenize, which neither can evaluate."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(answer).readline) if t.type not in _LAYOUT_TOKENS]
    except (tokenize.TokenError, SyntaxError):
        return False
    # Python reads identifiers NFKC-normalised: a fullwidth "＿＿class＿＿" is __class__.
    texts = [unicodedata.normalize("NFKC", t.string) if t.type == tokenize.NAME else t.string for t in tokens]
    for i, (token, text) in enumerate(zip(tokens, texts)):
        if token.type == tokenize.NAME and ("__" in text or text in _CODE_RUNNING_NAMES or text.startswith("plot")):
            return True
        if token.type == tokenize.OP and text == ".":  # attribute access; decimal points are inside numbers
            return True
        binary = i > 0 and (tokens[i - 1].type in (tokenize.NAME, tokenize.NUMBER) or texts[i - 1] in (")", "]"))
        if text == "**" and binary and _huge_power(texts[i + 1 :]):  # not markdown bold: **57**
            return True
    return False


def _huge_power(exponent: list[str]) -> bool:
    """Whether the tokens after a `**` make a power too large to compute: an exponent above _MAX_EXPONENT,
    a power in a bracketed exponent, or a second `**` right after the exponent."""
    signs = 0
    while signs < len(exponent) and exponent[signs] in "+-":
        signs += 1
    rest = exponent[signs:]
    if not rest:
        return False
    if rest[0] == "(":
        depth, end = 0, len(rest)
        for j, text in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(text, 0)
            if depth == 0:
                end = j
                break
        if "**" in rest[1:end]:
            return True
        after = rest[end + 1 : end + 2]
    else:
        try:
            if int(rest[0], 0) > _MAX_EXPONENT:  # 12_000, 0xFFFF as well
                return True
        except ValueError:  # a name or a non-integer number
            pass
        after = rest[1:2]
    return after == ["**"]


@dataclasses.dataclass(frozen=True)
class GymGold:
    """What the verifier needs to score an answer: the generator's entry and how to rebuild the generator."""

    answer: str | None
    dataset: str
    config: dict[str, Any]
    metadata: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, gold: str) -> GymGold:
        try:
            fields = json.loads(gold)
            return cls(**fields)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(
                f"{VERIFIER} verifier: the gold {gold[:100]!r} is not a reasoning-gym gold (a JSON object with "
                f"answer, dataset, config, metadata, as task.kind=reasoning_gym writes); use another task.verifier"
            ) from err


@functools.lru_cache(maxsize=64)
def _generator(dataset: str, config_json: str) -> Any:
    import reasoning_gym  # heavy: only where reasoning-gym tasks are used

    return reasoning_gym.create_dataset(dataset, **json.loads(config_json))


class ReasoningGymVerifier:
    """Correct when the generator's score_answer gives the answer at least `threshold` (default 1.0)."""

    name = VERIFIER

    def __init__(self, threshold: float = 1.0):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"{VERIFIER} verifier: threshold must be in (0, 1], found {threshold}")
        self.threshold = threshold

    def normalize(self, answer: str) -> str:
        return basic_normalize(answer)

    def score(self, answer: str, gold: str) -> float:
        """The generator's score of `answer` (0 when the scorer fails on it, or when the answer could run
        code in a scorer that evaluates it)."""
        stored = GymGold.from_json(gold)
        if evaluates_answers(stored.dataset) and may_run_code(answer):
            log.debug("%s: not scoring an answer that could run code: %r", stored.dataset, answer[:200])
            return 0.0
        generator = _generator(stored.dataset, json.dumps(stored.config, sort_keys=True))
        try:
            return float(generator.score_answer(answer, {"answer": stored.answer, "metadata": stored.metadata}))
        except Exception as err:  # a scorer failing on an odd answer: the answer is wrong, the run goes on
            log.debug("%s: score_answer failed on %r: %r", stored.dataset, answer[:200], err)
            return 0.0

    def check(self, answer: str, gold: str) -> bool:
        return self.score(answer, gold) >= self.threshold



def load_gym_task(cfg: TaskConfig, seed: int) -> Task:
    """Train and test problems of the reasoning-gym generator `cfg.name`, generated offline."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise TaskError("task.kind=reasoning_gym needs the reasoning-gym package: pip install reasoning-gym") from err
    known = reasoning_gym.factory.DATASETS
    if cfg.name not in known:
        close = difflib.get_close_matches(cfg.name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(known))}"
        raise TaskError(f"task.name: unknown reasoning-gym generator {cfg.name!r}; {hint}")
    if cfg.train_path or cfg.test_path:
        raise TaskError("task.train_path / task.test_path: reasoning-gym problems are generated, not read; unset them")
    options = dict(cfg.options)
    seed = options.pop("seed", seed)
    if not sys.flags.hash_randomization:  # PYTHONHASHSEED=0 when this process started
        train, test = _splits(cfg.name, options, seed)
    else:
        train, test = _splits_in_fixed_hash_process(cfg.name, json.dumps(options, sort_keys=True), seed)
    return Task(cfg.name, list(train), list(test), VERIFIER)


def _splits(name: str, options: dict[str, Any], seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, test) of generator `name`: train problems whose question is also a test one are dropped."""
    size = options.pop("size", DEFAULT_SIZE)
    test = _generate(name, "test", {**options, "seed": stable_seed(name, seed, "test") % 2**32, "size": size})
    test_questions = {p.question for p in test}
    train = _generate(name, "train", {**options, "seed": stable_seed(name, seed, "train") % 2**32, "size": size})
    kept = [p for p in train if p.question not in test_questions]
    if len(kept) < len(train):
        log.info("%s: dropped %d train problems that are also in the test split", name, len(train) - len(kept))
    return kept, test


@functools.lru_cache(maxsize=16)  # a process that loads a task again (a run's train and eval tasks) starts no second one
def _splits_in_fixed_hash_process(name: str, options_json: str, seed: int) -> tuple[tuple[Problem, ...], ...]:
    """_splits, run by `python -m drift_ray.gym_tasks` under PYTHONHASHSEED=0."""
    request = json.dumps({"name": name, "options": json.loads(options_json), "seed": seed})
    done = subprocess.run(
        [sys.executable, "-m", "drift_ray.gym_tasks"],
        input=request,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    if done.returncode != 0:
        raise TaskError(f"task.name {name!r}: generating its problems failed: {done.stderr.strip()[-2000:]}")
    reply = json.loads(done.stdout)
    if "error" in reply:
        raise TaskError(reply["error"])
    return tuple(tuple(Problem(**problem) for problem in reply[split]) for split in ("train", "test"))


def _serve_splits() -> None:
    """`python -m drift_ray.gym_tasks`: the request's splits (or its TaskError) as JSON on stdout."""
    request = json.load(sys.stdin)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the reply owns stdout
            splits = _splits(request["name"], request["options"], request["seed"])
        reply = {split: [dataclasses.asdict(p) for p in problems] for split, problems in zip(("train", "test"), splits)}
    except TaskError as err:
        reply = {"error": str(err)}
    json.dump(reply, sys.stdout)


def _generate(name: str, split: str, config: dict[str, Any]) -> list[Problem]:
    import reasoning_gym

    try:
        generator = _generator(name, json.dumps(config, sort_keys=True))  # the instance the verifier will use
    except (TypeError, ValueError, AssertionError) as err:
        _, config_cls = reasoning_gym.factory.DATASETS[name]
        fields = [f.name for f in dataclasses.fields(config_cls)]
        raise TaskError(
            f"task.options: reasoning-gym {name!r} rejects the config {config}: {err!r}; its fields: {fields}"
        ) from None
    verifier = ReasoningGymVerifier()
    problems = []
    for index in range(len(generator)):
        entry = generator[index]
        prompt_id = f"{name}-{split}-{index}"
        try:
            gold = GymGold(entry["answer"], name, config, entry["metadata"]).to_json()
        except TypeError as err:
            raise TaskError(f"{prompt_id}: reasoning-gym {name!r} makes entries JSON cannot store: {err}") from None
        if entry["answer"] is not None and not verifier.check(entry["answer"], gold):
            raise TaskError(
                f"{prompt_id}: reasoning-gym {name!r} scores its own answer {entry['answer'][:80]!r} "
                f"{verifier.score(entry['answer'], gold)} once the entry is stored as JSON (its scorer needs "
                "metadata that JSON does not keep, e.g. tuples); this generator is not supported"
            )
        problems.append(Problem(prompt_id, entry["question"], gold, {"dataset": name, "index": index}))
    return problems


if __name__ == "__main__":
    _serve_splits()
