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

Some scorers evaluate the answer: Python's `eval` (string_insertion, spiral_matrix, binary_matrix,
n_queens) or sympy (countdown, puzzle24, polynomial_multiplication, ...), whose parsing evaluates text.
A model's answer is data, so for a generator whose score_answer (or a method or function it calls) evals,
execs or parses with sympy, an answer reaches the scorer only when it is inert: one Python expression
(read by Python's parser as eval reads it) of numbers, names, strings, lists, tuples, comparisons and
arithmetic, where calls are only of elementary functions (sin, sqrt, exp, log, Abs, ...) on no string, no
number above 1,000, no other call (but in an Integral) and no product or power of numbers alone, no
string, list or tuple is an operand (`[0]*10**10`, `'%09999999d' % 0`), a power has no power inside it
and no integer exponent above 20, and no float literal is infinite (`1e999999`); for sympy, no string at
all (it turns strings back into code) and no exponent of four digits in a number (`1e-999999`); for eval,
which looks names up among the scorer's variables, no name is an operand, and none is one of them
(`oracle_answer`, the reference answer, would earn its partial credit).
Anything else scores 0: attribute access, subscripts, lambdas, f-strings, any other call (exec, open,
simplify, factorial, nextprime, ...). Text that does not parse cannot reach Python's eval, so it goes to
an eval-based scorer as it is (a grid "3 9 5 ..."); sympy's transformations could still turn it into
code ("99999999!" is a factorial), so for sympy it scores 0. The limits bound the work, not to the
second: sympy's simplify on an inert but large expression, or an unevaluated Integral it tries to
evaluate, can still take long. So these scorers run in killable helper processes (the verifier option
`timeout_s`, default 10 s per answer, and `max_processes`, default 2), and an answer that runs out of
time scores 0. The guard is still needed: a timeout bounds time, not what code does. These scorers
evaluate the gold too (its answer, or metadata such as an integrand), so their golds must be generated
here: read from a file (`task.kind: file` with `task.verifier: reasoning_gym`) they are refused at load, as
are golds of `composite`, which forwards each answer to the scorer of the generator its metadata names. The
generator of every other gold read from a file is built at load, so that a config it rejects is named with
its problem rather than at the first answer scored.

Problems are generated in a process with a fixed hash seed (PYTHONHASHSEED=0; this one when it has it),
so that every process gets the same ones for a config: a resumed run, `drift-ray eval` after `drift-ray
run`, a job's driver. The scorers' dependence on hashing is met by the stored entry, as above.

Loading checks that each problem's own answer is correct through the stored gold, with the task's verifier
options, so a generator whose metadata JSON cannot carry (arc_agi and rearc keep grids as tuples), or
whose scorer takes longer than `timeout_s` on its own answer, is refused instead of marking every answer
wrong. Generators without a single reference answer (answer None: rubiks_cube, rush_hour, ...) have
nothing to check there.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ast
import cmath
import importlib
import inspect
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, Collection

from drift_ray import schema
from drift_ray.config import TaskConfig
from drift_ray.episode import stable_seed
from drift_ray.prompts import Problem, Task, TaskError
from drift_ray.verifiers import (
    ChoiceVerifier,
    ExactVerifier,
    HelperProcesses,
    MathVerifier,
    NumericVerifier,
    basic_normalize,
    get_verifier,
    kill_on_sigterm,
    options_mismatch,
)

log = logging.getLogger(__name__)

VERIFIER = "reasoning_gym"
DEFAULT_SIZE = 500
COMPOSITE = "composite"  # the generator that mixes others: neither generated here nor scored
_NEEDS_THE_PACKAGE = (
    "needs the reasoning-gym package: pip install -e '.[gym]' in the repository, or pip install 'reasoning-gym>=0.1.25'"
)

# Functions an answer of an evaluating scorer may call: elementary ones, quick on any argument, and
# Integral (intermediate_integration's answers leave some unevaluated).
_ELEMENTARY_FUNCTIONS = frozenset(
    "sin cos tan cot sec csc asin acos atan acot asec acsc atan2 sinh cosh tanh coth asinh acosh atanh "
    "exp log ln sqrt cbrt Abs abs sign Integral".split()
)
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.UAdd, ast.USub, ast.Not)
_INERT_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.And, ast.Or, ast.Compare, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE, ast.Constant, ast.Name, ast.Load, ast.List, ast.Tuple, ast.Call, *_ARITHMETIC,
)
# Far above the reference answers' (exponents up to 10, numbers in calls up to 5), far below what would
# take sympy seconds: simplify expands a power of a sum, int() computes every digit of exp(n).
_MAX_EXPONENT = 20
_MAX_CALL_NUMBER = 1000


@functools.lru_cache(maxsize=None)
def _scorer_functions(dataset: str) -> tuple[Any, ...]:
    """The score_answer of generator `dataset`, and the methods and Python functions it calls, and theirs."""
    import reasoning_gym

    generator_class, _ = reasoning_gym.factory.DATASETS[dataset]
    seen, pending = {}, [generator_class.score_answer]
    while pending:
        function = pending.pop()
        if not inspect.isfunction(function) or function in seen:
            continue
        seen[function] = None
        called = inspect.getsource(function)
        pending += [getattr(generator_class, name, None) for name in re.findall(r"\bself\.(\w+)\(", called)]
        pending += [function.__globals__.get(name) for name in re.findall(r"(?<![.\w])(\w+)\(", called)]
    return tuple(seen)


@functools.lru_cache(maxsize=None)
def answer_evaluation(dataset: str) -> str | None:
    """How the scorer of generator `dataset` may evaluate an answer, from the source of its score_answer and
    of the methods and functions that calls: "sympy" (parse_expr, sympify or S parse text by evaluating
    it), "python" (eval or exec), or None."""
    source = "\n".join(inspect.getsource(function) for function in _scorer_functions(dataset))
    if re.search(r"\b(?:parse_expr|sympify|S)\(", source):
        return "sympy"
    return "python" if re.search(r"\b(?:eval|exec)\(", source) else None


def refused_answer(dataset: str, answer: str) -> bool:
    """Whether `answer` must not reach the scorer of generator `dataset`: it evaluates answers, and this
    one may run code there, or read the scorer's own variables."""
    evaluation = answer_evaluation(dataset)
    if evaluation is None:
        return False
    return may_run_code(answer, sympy=evaluation == "sympy", scorer_names=_scorer_variables(dataset))


@functools.lru_cache(maxsize=None)
def _scorer_variables(dataset: str) -> frozenset[str]:
    """The local variable names of the scorer of generator `dataset` and of what it calls."""
    return frozenset(name for function in _scorer_functions(dataset) for name in function.__code__.co_varnames)


def may_run_code(answer: str, sympy: bool, scorer_names: Collection[str] = ()) -> bool:
    """Whether `answer` is not inert for a scorer that evaluates it (see the module docstring): with `sympy`,
    also text that does not parse, which sympy's transformations could still make code of. `scorer_names`:
    the scorer's variables, which Python's eval would read for a name (`oracle_answer` is its reference
    answer, worth its partial credit)."""
    try:
        # As eval reads it: its parser (which reads past a comment and "\r"), after eval's own stripping.
        tree = ast.parse(answer.lstrip(" \t"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return sympy
    # sympy reads a float literal's digits itself: 1e-999999 is 0.0 to Python and seconds of work to sympy.
    if sympy and re.search(r"[eE][-+]?\d{4,}", answer):
        return True
    for node in ast.walk(tree):
        if not isinstance(node, _INERT_NODES):
            return True
        # sympy turns a string back into code wherever it meets one (diff of a str sympifies it).
        if sympy and isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            return True
        if isinstance(node, ast.Name) and "__" in node.id:
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, (float, complex)) and not cmath.isfinite(node.value):
            return True  # 1e999999: sympy reads the digits itself, slowly
        # Python's eval looks names up among the scorer's variables: a name is inert alone (a word, as
        # string_insertion's answers are), unless it is one of them, and never as an operand (x * 10**9).
        if not sympy and isinstance(node, ast.Name) and node.id in scorer_names:
            return True
        if not sympy and isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call)):
            if any(isinstance(n, ast.Name) for n in ast.iter_child_nodes(node) if n is not getattr(node, "func", None)):
                return True
        if isinstance(node, ast.Call) and not _elementary_call(node):
            return True
        if isinstance(node, ast.BinOp) and _is_sequence(node):
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and _huge_power(node):
            return True
    return False


def _elementary_call(call: ast.Call) -> bool:
    """A call of an elementary function by its name, without keywords, strings (sympy parses those),
    numbers above _MAX_CALL_NUMBER, calls, or products or powers of numbers alone in its arguments."""
    inside = [n for a in call.args for n in ast.walk(a)]
    constants = [n.value for n in inside if isinstance(n, ast.Constant)]
    return (
        isinstance(call.func, ast.Name)
        and call.func.id in _ELEMENTARY_FUNCTIONS
        and not call.keywords
        and not any(isinstance(c, str) or (isinstance(c, (int, float)) and abs(c) > _MAX_CALL_NUMBER) for c in constants)
        # exp(exp(exp(5))), exp(1000*1000*1000): what the numbers compute to is not bounded by each of them.
        # (Integral's integrand may hold calls: each is checked as a call of its own.)
        and (call.func.id == "Integral" or not any(isinstance(n, ast.Call) for n in inside))
        and not any(_numbers_only(a) and any(isinstance(n, (ast.Mult, ast.Pow)) for n in ast.walk(a)) for a in call.args)
    )


def _numbers_only(node: ast.AST) -> bool:
    return not any(isinstance(n, ast.Name) for n in ast.walk(node))


def _is_sequence(operation: ast.BinOp) -> bool:
    """Whether an operand is a string, list or tuple: repeated or formatted ('%0999999999d' % 0), it
    could fill memory."""
    return any(
        isinstance(side, (ast.List, ast.Tuple)) or (isinstance(side, ast.Constant) and isinstance(side.value, str))
        for side in (operation.left, operation.right)
    )


def _huge_power(power: ast.BinOp) -> bool:
    """A power inside a power (9**9**9, (10**9)**9) or an integer exponent above _MAX_EXPONENT."""
    inner = [n for side in (power.left, power.right) for n in ast.walk(side)]
    if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in inner):
        return True
    return any(
        isinstance(n, ast.Constant) and isinstance(n.value, int) and abs(n.value) > _MAX_EXPONENT
        for n in ast.walk(power.right)
    )


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
            fields = schema.loads_json(gold)
            stored = cls(**fields)
        except (ValueError, TypeError) as err:  # not JSON, a key written twice, or other keys
            raise ValueError(
                f"{VERIFIER} verifier: the gold {gold[:100]!r} is not a reasoning-gym gold (a JSON object with "
                f"answer, dataset, config, metadata, as task.kind=reasoning_gym writes); use another task.verifier"
            ) from err
        if stored.dataset == COMPOSITE:
            # Its scorer forwards to the generator the metadata names, whatever that one evaluates (the static
            # scan, answer_evaluation, sees only the forwarding), and its config cannot be rebuilt from JSON.
            raise ValueError(
                f"{VERIFIER} verifier: a gold of reasoning-gym's {COMPOSITE}, which is not supported: give each "
                "problem the gold of the generator that made it"
            )
        return stored


@functools.lru_cache(maxsize=64)
def _generator(dataset: str, config_json: str) -> Any:
    import reasoning_gym  # heavy: only where reasoning-gym tasks are used

    return reasoning_gym.create_dataset(dataset, **json.loads(config_json))


def _gold_generator(stored: GymGold) -> Any:
    """The generator of the gold `stored`, or a ValueError naming its generator and config: the config is data
    where the gold is read from a file."""
    try:
        return _generator(stored.dataset, json.dumps(stored.config, sort_keys=True))
    except Exception as err:  # the generator's unchecked config fails in any way, in its __init__
        raise ValueError(
            f"{VERIFIER} verifier: reasoning-gym {stored.dataset!r} cannot be built from the gold's config "
            f"{schema.short_repr(stored.config)}: {err!r}"
        ) from err


def _score(answer: str, stored: GymGold) -> float:
    """The generator's score of `answer`; 0 when the scorer fails on it (an odd answer is a wrong one)."""
    generator = _gold_generator(stored)  # not the answer's fault: raised, not scored 0
    try:
        return float(generator.score_answer(answer, {"answer": stored.answer, "metadata": stored.metadata}))
    except Exception as err:
        log.debug("%s: score_answer failed on %r: %r", stored.dataset, answer[:200], err)
        return 0.0


def _init_scoring_helper() -> None:
    """A scoring helper's start: reasoning-gym, sympy, and sympy's lazy set-up on first use (a few tenths of
    a second) are not an answer's work."""
    import sympy

    kill_on_sigterm()
    importlib.import_module("reasoning_gym")
    x = sympy.Symbol("x")
    sympy.simplify(sympy.diff(sympy.parse_expr("x**2/2 + sin(x) + C", local_dict={"x": x}), x) - x)


class ReasoningGymVerifier:
    """Correct when the generator's score_answer gives the answer at least `threshold`.

    A scorer that evaluates answers runs in one of `max_processes` helper processes with `timeout_s`
    seconds per answer (HelperProcesses): sympy may take long on an inert answer. Other scorers run here.
    Scores are cached per (answer, gold), so an answer repeated over turns and samples costs one timeout.
    """

    name = VERIFIER

    def __init__(self, threshold: float, timeout_s: float, max_processes: int, cache_size: int):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"{VERIFIER} verifier: threshold must be in (0, 1], found {threshold}")
        self._helpers = HelperProcesses(
            f"{VERIFIER} verifier", timeout_s, max_processes, _init_scoring_helper,
            "each imports reasoning-gym before it takes the first answer",
        )
        self.threshold, self.timeout_s, self.max_processes, self.cache_size = threshold, timeout_s, max_processes, cache_size
        self._cached_score = functools.lru_cache(maxsize=cache_size)(self._score_uncached)

    def __reduce__(self) -> tuple[type[ReasoningGymVerifier], tuple[float, float, int, int]]:
        # Ray ships objects between processes: send the settings, not the helper processes or the cache.
        return (type(self), (self.threshold, self.timeout_s, self.max_processes, self.cache_size))

    def normalize(self, answer: str) -> str:
        return basic_normalize(answer)

    def score(self, answer: str, gold: str) -> float:
        """The generator's score of `answer`: 0 when the scorer fails on it, takes longer than timeout_s, or
        evaluates answers and this one could run code there."""
        score = self.score_unless_given_up(answer, gold)
        return 0.0 if score is None else score

    def score_unless_given_up(self, answer: str, gold: str) -> float | None:
        """score, but None where it gave up: the scorer took longer than timeout_s or its helper died."""
        return self._cached_score(answer, gold)

    def check(self, answer: str, gold: str) -> bool:
        return self.score(answer, gold) >= self.threshold

    def close(self) -> None:
        """Stop the helper processes (see HelperProcesses.close)."""
        self._helpers.close()

    def _score_uncached(self, answer: str, gold: str) -> float | None:
        stored = GymGold.from_json(gold)
        if answer_evaluation(stored.dataset) is None:
            return _score(answer, stored)
        if refused_answer(stored.dataset, answer):
            log.debug("%s: not scoring an answer that could run code: %r", stored.dataset, answer[:200])
            return 0.0
        return self._helpers.run(_score, answer, stored)


def refuse_evaluated_golds(problems: Sequence[Problem], key: str) -> None:
    """Refuse golds that reasoning-gym did not generate here (a file's, a hub copy's) for a generator whose
    scorer evaluates text: it evaluates the gold too, its answer (number_sorting) or its metadata
    (bitwise_arithmetic's problem, the integrand of the integrations), and the data would run as code.
    `key`: the config key the problems come from, for the error."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise TaskError(f"{key}: the reasoning_gym verifier {_NEEDS_THE_PACKAGE}") from err
    for problem in problems:
        try:
            stored = GymGold.from_json(problem.gold)
        except ValueError as err:
            raise TaskError(f"{key}: problem {problem.prompt_id!r}: {err}") from None
        dataset = stored.dataset
        if dataset not in reasoning_gym.factory.DATASETS:
            raise TaskError(f"{key}: problem {problem.prompt_id!r}: its gold names no reasoning-gym generator ({dataset!r})")
        evaluation = answer_evaluation(dataset)
        if evaluation is not None:
            raise TaskError(
                f"{key}: problem {problem.prompt_id!r} is one of {dataset}, whose scorer evaluates text with "
                f"{'sympy' if evaluation == 'sympy' else 'Python'}, the gold's as well as the answer's, so a gold read "
                "from data would run as code there; generate these problems with kind: reasoning_gym"
            )
        try:  # now, with its problem named, not at the first answer scored (building one takes under a second)
            _gold_generator(stored)
        except ValueError as err:
            raise TaskError(f"{key}: problem {problem.prompt_id!r}: {err}") from None


def load_gym_task(cfg: TaskConfig, seed: int) -> Task:
    """Train and test problems of the reasoning-gym generator `cfg.name`, generated offline."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise TaskError(f"task.kind=reasoning_gym {_NEEDS_THE_PACKAGE}") from err
    known = reasoning_gym.factory.DATASETS
    if cfg.name not in known:
        close = difflib.get_close_matches(cfg.name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(known))}"
        raise TaskError(f"task.name: unknown reasoning-gym generator {cfg.name!r}; {hint}")
    if cfg.name == COMPOSITE:  # its config holds configs of other generators, which it cannot rebuild from JSON
        raise TaskError("task.name: reasoning-gym's composite is not supported; train on one generator per task")
    _, config_cls = known[cfg.name]
    mismatch = options_mismatch(config_cls, cfg.options)  # seed and size are fields of every generator's config
    if mismatch:
        raise TaskError(f"task.options: {mismatch}")
    # A gold is a reasoning-gym entry (JSON), which drift-ray's other verifiers would compare as text: every
    # answer would be wrong, and every return equal.
    if cfg.verifier in (ExactVerifier.name, NumericVerifier.name, ChoiceVerifier.name, MathVerifier.name):
        raise TaskError(
            f"task.verifier: {cfg.verifier!r} cannot read a reasoning-gym gold (the generator's entry, as JSON); "
            f"leave task.verifier unset to score with the generator's own scorer ({VERIFIER!r})"
        )
    options = dict(cfg.options)
    option_seed = options.pop("seed", None)  # null, as unset: the run's seed
    seed = seed if option_seed is None else option_seed
    # Reference answers are checked with the options the run will score with (the defaults when task.verifier
    # names a verifier of a plugin)
    verifier_options = dict(cfg.verifier_options) if cfg.verifier in (None, VERIFIER) else {}
    try:
        get_verifier(VERIFIER, **verifier_options)  # checks the options; starts no helper process
    except (TypeError, ValueError) as err:
        raise TaskError(f"task.verifier_options: {err}") from None
    if not sys.flags.hash_randomization:  # PYTHONHASHSEED=0 when this process started
        _tell_generating(cfg.name, options)
        train, test = _splits(cfg.name, options, seed, verifier_options)
    else:
        train, test = _splits_in_fixed_hash_process(
            cfg.name, json.dumps(options, sort_keys=True), seed, json.dumps(verifier_options, sort_keys=True)
        )
    return Task(cfg.name, list(train), list(test), VERIFIER)


def _tell_generating(name: str, options: dict[str, Any]) -> None:
    # Scoring every reference answer takes a while (half a minute for the default size of some generators).
    size = options.get("size", DEFAULT_SIZE)
    log.info(
        "reasoning-gym %r: generating %d train and %d test problems (task.options.size) and scoring their "
        "reference answers", name, size, size,
    )


def _splits(
    name: str, options: dict[str, Any], seed: int, verifier_options: dict[str, Any]
) -> tuple[list[Problem], list[Problem]]:
    """(train, test) of generator `name`: train problems whose question is also a test one are dropped."""
    size = options.pop("size", DEFAULT_SIZE)
    verifier = get_verifier(VERIFIER, **verifier_options)
    try:
        test = _generate(name, "test", {**options, "seed": stable_seed(name, seed, "test") % 2**32, "size": size}, verifier)
        test_questions = {p.question for p in test}
        train = _generate(name, "train", {**options, "seed": stable_seed(name, seed, "train") % 2**32, "size": size}, verifier)
    finally:
        verifier.close()
    kept = [p for p in train if p.question not in test_questions]
    if len(kept) < len(train):
        log.info("%s: dropped %d train problems that are also in the test split", name, len(train) - len(kept))
    return kept, test


@functools.lru_cache(maxsize=16)  # a process that loads a task again (a run's train and eval tasks) starts no second one
def _splits_in_fixed_hash_process(
    name: str, options_json: str, seed: int, verifier_options_json: str
) -> tuple[tuple[Problem, ...], ...]:
    """_splits, run by serve_splits in a child process under PYTHONHASHSEED=0."""
    options = json.loads(options_json)
    _tell_generating(name, options)
    request = json.dumps({"name": name, "options": options, "seed": seed, "verifier_options": json.loads(verifier_options_json)})
    done = subprocess.run(
        # Not `-m drift_ray.gym_tasks`: that runs this file as __main__ beside the drift_ray.gym_tasks that
        # the verifier imports, two copies of the module and its caches.
        [sys.executable, "-c", "from drift_ray.gym_tasks import serve_splits; serve_splits()"],
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


def serve_splits() -> None:
    """The splits a JSON request on stdin asks for (or its TaskError), as JSON on stdout."""
    request = json.load(sys.stdin)
    # The reply owns stdout: whatever else writes there, this process or the helper processes it starts
    # (which inherit file descriptor 1), goes to stderr.
    reply_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # and what sys.stdout holds in its buffer
    try:
        splits = _splits(request["name"], request["options"], request["seed"], request["verifier_options"])
        reply = {split: [dataclasses.asdict(p) for p in problems] for split, problems in zip(("train", "test"), splits)}
    except TaskError as err:
        reply = {"error": str(err)}
    with reply_stream:
        json.dump(reply, reply_stream)


def _generate(name: str, split: str, config: dict[str, Any], verifier: ReasoningGymVerifier) -> list[Problem]:
    import reasoning_gym

    try:
        generator = _generator(name, json.dumps(config, sort_keys=True))  # cached: a verifier in this process reuses it
        # Its config is an unchecked dataclass: a value of the wrong type (a float for an int) fails only here.
        entries = [generator[index] for index in range(len(generator))]
    except (TypeError, ValueError, AssertionError) as err:
        _, config_cls = reasoning_gym.factory.DATASETS[name]
        fields = [f.name for f in dataclasses.fields(config_cls)]
        raise TaskError(
            f"task.options: reasoning-gym {name!r} rejects the config {config}: {err!r}; its fields: {fields}"
        ) from None
    problems = []
    for index, entry in enumerate(entries):
        prompt_id = f"{name}-{split}-{index}"
        try:
            gold = GymGold(entry["answer"], name, config, entry["metadata"]).to_json()
        except TypeError as err:
            raise TaskError(f"{prompt_id}: reasoning-gym {name!r} makes entries JSON cannot store: {err}") from None
        if entry["answer"] is not None:
            _require_reference_scores(verifier, name, prompt_id, entry["answer"], gold)
        problems.append(Problem(prompt_id, entry["question"], gold, {"dataset": name, "index": index}))
    return problems


def _require_reference_scores(verifier: ReasoningGymVerifier, name: str, prompt_id: str, answer: str, gold: str) -> None:
    """Refuse generator `name` unless `verifier` finds the reference `answer` of its problem `prompt_id` right."""
    if refused_answer(name, answer):
        raise TaskError(
            f"{prompt_id}: reasoning-gym {name!r} gives the answer {answer[:80]!r}, which its scorer would "
            "evaluate and which is beyond what answers may hold (numbers, exponents and calls are bounded: see "
            "drift_ray/gym_tasks.py); this generator or config is not supported"
        )
    score = verifier.score_unless_given_up(answer, gold)
    if score is None:
        raise TaskError(
            f"{prompt_id}: reasoning-gym {name!r} takes longer than the {VERIFIER} verifier's option timeout_s "
            f"({verifier.timeout_s:g} s) to score its own answer {answer[:80]!r} (or its helper process died)"
        )
    if score < verifier.threshold:
        raise TaskError(
            f"{prompt_id}: reasoning-gym {name!r} scores its own answer {answer[:80]!r} {score} once the entry is "
            "stored as JSON (its scorer needs metadata that JSON does not keep, e.g. tuples); this generator is "
            "not supported"
        )
