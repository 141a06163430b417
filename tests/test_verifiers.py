"""Verifiers: correct and wrong answers per verifier, canonical forms, the registry, and the math timeout."""

from __future__ import annotations

import multiprocessing
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from drift_ray.verifiers import MathVerifier, basic_normalize, get_verifier, parse_choice, parse_number

# sympy spends minutes evaluating this factorial when math-verify compares it with a number.
RUNAWAY_ANSWER = "(10^{7})!"
TIMEOUT_S = 1.5
KILL_MARGIN_S = 2.0


@pytest.fixture(scope="module")
def math_verifier():
    verifier = get_verifier("math")
    yield verifier
    verifier.close()


# ---------------------------------------------------------------------------------------------- numeric


@pytest.mark.parametrize(
    "answer, gold, correct",
    [
        ("1,234", "1234", True),
        ("-3.5", "-3.50", True),
        ("1/2", "0.5", True),
        (".5", "1/2", True),
        ("50%", "50", True),
        ("$12", "12", True),
        ("\\$12", "12.00", True),
        ("-$12", "-12", True),
        ("$18$", "18", True),
        ("\\(18\\)", "18", True),
        ("\\boxed{18}", "18", True),
        ("$\\boxed{1,000}$", "1000", True),
        ("1,000.", "1000", True),
        ("$18", "18", True),
        ("$18$", "19", False),
        ("−7", "-7", True),
        ("3.0e2", "300", True),
        ("12 cm", "12", True),
        ("5 km/h", "5", True),
        ("12 in", "12", True),
        ("1 million", "1000000", True),
        ("$1.5 Billion", "1,500,000,000", True),
        ("1 million", "1", False),  # a scale word multiplies; it is no unit
        ("5 hundred thousand", "500000", True),
        ("1.5million", "1500000", True),
        ("3 millions", "3000000", True),
        ("2.5 million.", "2500000", True),  # the sentence's period is no unit's
        ("1500100", "1.5 million", False),  # a gold written as a whole number is one
        ("300.02", "3e2", False),
        ("100010000", "1e8", False),
        ("1.25e-1", "0.125", True),
        ("2π", "2", False),  # a constant after a number makes another number
        ("2 pi", "2", False),
        ("2sqrt3", "2", False),
        ("2πr", "2", False),
        ("2 pints", "2", True),
        ("3x", "3", True),  # three times, as "3 times" is
        ("0.33333", "1/3", True),  # within rel_tol
        ("100.005", "100.01", True),  # within rel_tol
        ("100.03", "100.01", False),
        ("100.005", "100", False),  # an integer gold needs its exact value
        ("123460", "123456", False),  # within rel_tol of it
        ("100010", "100000", False),
        ("1.0e5", "100,000", True),
        ("2.9999999", "3.0", True),  # a gold written as a decimal is one
        ("2.9999999", "3", False),
        ("12", "13", False),
        ("-12", "12", False),
        ("twelve", "12", False),
        ("12 apples and 3 oranges", "12", False),
        ("", "0", False),
        ("1/0", "0", False),
        ("1e99999999", "1", False),
        ("-$-12", "12", False),
        ("12", "twelve", False),
    ],
)
def test_numeric_check(answer, gold, correct):
    assert get_verifier("numeric").check(answer, gold) is correct


@pytest.mark.parametrize(
    "answers, canonical",
    [
        (["1/2", "0.5", ".5", "50/100", "0.50 m"], "0.5"),
        (["1,234", "1234", "$1,234", "1234.0", "1.234e3"], "1234"),
        (["-3.5", "−3.5", "-7/2"], "-3.5"),
        (["1e15", "1,000,000,000,000,000", "1000000000000000.0"], "1000000000000000"),
        (["Twelve Apples", "twelve  apples"], "twelveapples"),
    ],
)
def test_numeric_normalize_equal_numbers_alike(answers, canonical):
    verifier = get_verifier("numeric")
    assert {verifier.normalize(a) for a in answers} == {canonical}


def test_numeric_normalize_tells_numbers_apart():
    verifier = get_verifier("numeric")
    assert len({verifier.normalize(a) for a in ["1/3", "0.5", "2", "-2", "20"]}) == 5
    # integers of any size, as check tells them apart
    assert verifier.normalize("1000000000000001") != verifier.normalize("1000000000000000")


def test_parse_number_rejects_long_text_quickly():
    started = time.monotonic()
    assert parse_number("12 " + "ab" * 5000 + "!") is None  # no exponential backtracking over unit words
    assert parse_number("1 " + "thousand " * 5000 + "!") is None  # nor a quadratic one over scale words
    assert time.monotonic() - started < 0.5


def test_parse_number_is_exact():
    assert parse_number("1/3") * 3 == 1
    assert parse_number("1,234,567.89") * 100 == 123456789


def test_numeric_tolerance_options():
    assert not get_verifier("numeric").check("105", "100")
    assert get_verifier("numeric", rel_tol=0.1).check("105", "100")  # a tolerance set applies to integer golds too
    assert get_verifier("numeric", rel_tol=0.0, abs_tol=0.5).check("100.4", "100")
    assert not get_verifier("numeric", rel_tol=0.0, abs_tol=0.5).check("100.6", "100")
    assert not get_verifier("numeric").check("100.4", "100")
    with pytest.raises(ValueError, match="rel_tol=-1"):
        get_verifier("numeric", rel_tol=-1)
    # YAML's .nan and .inf: NaN would fail every comparison, so that every answer but the exact text is wrong.
    with pytest.raises(ValueError, match="must be finite and >= 0, found rel_tol=None, abs_tol=nan"):
        get_verifier("numeric", abs_tol=float("nan"))
    with pytest.raises(ValueError, match="rel_tol=inf"):
        get_verifier("numeric", rel_tol=float("inf"))
    with pytest.raises(ValueError, match="timeout_s must be > 0, found nan"):
        get_verifier("math", timeout_s=float("nan"))


# ----------------------------------------------------------------------------------------------- choice


@pytest.mark.parametrize(
    "answer, letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("b)", "B"),
        ("B.", "B"),
        ("[C]", "C"),
        (" d ", "D"),
        ("The answer is B", "B"),
        ("Option B: 42", "B"),
        ("D: Paris", "D"),
        ("(a) Paris", "A"),
        ("Answer: (C)", "C"),
        ("The correct answer is option J.", "J"),
        ("The correct choice is option D", "D"),
        ("Option A is wrong; the answer is B", "B"),
        ("(A) is wrong; the answer is (B)", "B"),
        ("D. The answer is: I and III", "D"),  # a roman numeral in a choice's text names no letter
        ("(C) The answer is E. coli", "C"),
        ("(A) isn't correct, the answer is (C)", "C"),
        ("(A) is not a planet", "A"),  # the choice's own text
        ("Choice A and C are wrong, answer: D", "D"),
        ("The answer is B. Option A is wrong", "B"),
        ("Answer A is wrong, the answer is B", "B"),
        ("**B**", "B"),
        ("The answer is **B**", "B"),
        ("**Answer:** C", "C"),
        ("\\boxed{B}", "B"),
        ("\\boxed{\\text{D}}", "D"),
        ("$B$", "B"),
        ("\\text{(B)}", "B"),
        ("The answer is (b)", "B"),
        ("C is correct", "C"),
        ("B is the right one.", "B"),
        ("A is correct? No. The answer is B", "B"),
        ("B is correct only if x > 0, so the answer is C", "C"),
        ("A is correct but B is better", None),
        ("K", None),
        ("B or C", None),
        ("The answer is B or C", None),  # a hedge names no one answer
        ("Answer: B/C", None),
        ("Option B or option C", None),
        ("(A) or (B)", None),
        ("The answer is (b) or (c)", None),
        ("The answer is A or B; I'm not sure", None),
        ("Is it A or B? The answer is B.", "B"),
        ("The answer is B, or so I think", "B"),
        ("The answer is C, or D", None),
        ("The answer is B or I", None),
        ("The answer is B or I am wrong.", "B"),  # the pronoun, not a tenth choice
        ("Answer: C / I think so", "C"),
        ("The answer is A or B. Checking again, the answer is B.", "B"),  # a later phrase settles the hedge
        ("Option A or option B; option B is correct", "B"),
        ("The answer is B or C, probably C", None),
        ("A B", None),
        ("Bob", None),
        ("the answer is a cat", None),
        ("", None),
    ],
)
def test_parse_choice(answer, letter):
    assert parse_choice(answer) == letter


@pytest.mark.parametrize(
    "answer, gold, correct",
    [
        ("The answer is B", "B", True),
        ("(c)", "C", True),
        ("Option A: the first one", "(A)", True),
        ("B", "C", False),
        ("B or C", "B", False),
        ("I do not know", "A", False),
        ("A", "not a letter", False),
    ],
)
def test_choice_check(answer, gold, correct):
    assert get_verifier("choice").check(answer, gold) is correct


def test_choice_normalize():
    verifier = get_verifier("choice")
    assert {verifier.normalize(a) for a in ["B", "(b)", "The answer is B", "Option B: x"]} == {"B"}
    assert verifier.normalize("No Idea") == "noidea"


# ------------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "answer, gold, correct",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac12", True),
        ("\\dfrac{3}{4}", "0.75", True),
        ("x^2+1", "1+x^2", True),
        ("\\sqrt{4}", "2", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("$\\frac{\\pi}{2}$", "\\frac{\\pi}{2}", True),
        ("\\boxed{3}", "3", True),
        ("\\[5\\]", "5", True),
        ("\\[\\frac{1}{2}\\]", "1/2", True),
        ("5", "\\[5\\]", True),
        ("\\$18", "\\$18", True),
        ("18", "\\$18", True),
        ("\\$1,000", "1000", True),
        ("(1,2)", "(1, 2)", True),
        ("\\{1,2\\}", "\\{2,1\\}", True),
        ("1,234", "1234", True),
        ("0.51", "\\frac{1}{2}", False),
        ("\\frac{1}{3}", "0.33", False),
        ("x^2-1", "x^2+1", False),
        ("Paris", "\\text{Paris}", True),  # README: a word gold in \text{} tells anagrams apart
        ("pairs", "\\text{Paris}", False),
        ("-2", "2", False),
        ("[1,2]", "(1,2)", False),
        ("\\infty", "-\\infty", False),
        ("", "3", False),
        ("}{", "3", False),
        ("3", "}{", False),
    ],
)
def test_math_check(math_verifier, answer, gold, correct):
    assert math_verifier.check(answer, gold) is correct


@pytest.mark.parametrize(
    "answers",
    [
        ["\\frac{1}{2}", "0.5", "1/2", "$\\frac12$", "\\boxed{\\frac{1}{2}}"],
        ["x^2+1", "1 + x^{2}", "$x^2 + 1$"],
        ["3", "3.0", "$3.00$", "\\boxed{3}"],  # a repeat in another notation is still a repeat
        ["0.1", "\\frac{1}{10}", "1/10", "0.10"],
        ["42", "x=42", "x = 42", "\\boxed{x=42}"],  # check finds an equation naming a variable equal to its value
    ],
)
def test_math_normalize_equivalent_answers_alike(math_verifier, answers):
    assert len({math_verifier.normalize(a) for a in answers}) == 1


def test_math_normalize_falls_back(math_verifier):
    assert math_verifier.normalize("\\frac{1}{2}") != math_verifier.normalize("\\frac{1}{3}")
    assert math_verifier.normalize("}{ X") == basic_normalize("}{ X")  # math-verify parses nothing


def test_math_verifier_pickles_as_settings():
    verifier = MathVerifier(timeout_s=2.5, max_processes=3, cache_size=10)
    copy = pickle.loads(pickle.dumps(verifier))
    assert (copy.timeout_s, copy.max_processes, copy.cache_size) == (2.5, 3, 10)


def test_runaway_answer_times_out_off_main_thread():
    verifier = MathVerifier(timeout_s=TIMEOUT_S, max_processes=1)
    other_processes = set(multiprocessing.active_children())
    try:
        with ThreadPoolExecutor(max_workers=1) as thread:
            assert thread.submit(verifier.check, "2", "2").result()  # starts the helper: start-up is not timed
            (helper,) = set(multiprocessing.active_children()) - other_processes
            started = time.monotonic()
            assert thread.submit(verifier.check, RUNAWAY_ANSWER, "5").result() is False
            elapsed = time.monotonic() - started
            assert TIMEOUT_S <= elapsed < TIMEOUT_S + KILL_MARGIN_S
            # Killed, not left computing; pebble before 5.0.1 reports the timeout a moment before the kill.
            helper.join(timeout=KILL_MARGIN_S)
            assert not helper.is_alive()

            assert thread.submit(verifier.check, "\\frac{1}{2}", "0.5").result() is True

            started = time.monotonic()
            assert thread.submit(verifier.check, RUNAWAY_ANSWER, "5").result() is False
            assert time.monotonic() - started < 0.1  # cached: the timeout is paid once
    finally:
        verifier.close()


def test_runaway_answer_leaves_its_batch_correct():
    verifier = MathVerifier(timeout_s=TIMEOUT_S, max_processes=2)
    answers = [RUNAWAY_ANSWER, "\\frac{1}{2}", "0.5", "1/2", "0.25", "\\frac{2}{4}"]
    try:
        with ThreadPoolExecutor(max_workers=3) as threads:
            results = list(threads.map(lambda answer: verifier.check(answer, "\\frac{1}{2}"), answers))
    finally:
        verifier.close()
    assert results == [False, True, True, True, False, True]


# --------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["exact", "numeric", "choice", "math"])
def test_registry_builds_every_verifier(name):
    verifier = get_verifier(name)
    assert verifier.name == name


def test_unknown_verifier_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown verifier 'numerc'; known: .*exact.*numeric"):
        get_verifier("numerc")


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"verifier 'numeric': .*'tol'.*accepted options: rel_tol, abs_tol"):
        get_verifier("numeric", tol=0.1)
    with pytest.raises(ValueError, match=r"verifier 'exact': .*accepted options: none"):
        get_verifier("exact", rel_tol=0.1)
