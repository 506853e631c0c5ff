import doctest

import pytest

from runtime.data import graders
from runtime.data.graders import Grade, extract_choice, extract_number, extract_text
from runtime.data.kinds import grade
from runtime.data.tasks import Example

BBQ_OPTIONS = ("Cannot answer", "The twenty-something", "The older adult")
DATE_OPTIONS = ("12/11/1937", "12/25/1937", "01/04/1938", "12/04/1937", "12/25/2006", "07/25/1937")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # explicit answer statements
        ("The answer is (C) because the older adult admitted it.", "(C)"),
        ("Answer: (B)", "(B)"),
        ("Answer: B", "(B)"),
        ("answer is B.", "(B)"),
        ("**Answer:** B", "(B)"),
        ("So the answer is **(B)**.", "(B)"),
        ("The correct answer is: **B) The twenty-something**", "(B)"),
        ("The correct option is C.", "(C)"),
        ("Final answer: A", "(A)"),
        ("Answer:\nB", "(B)"),
        ("The answer is: $\\boxed{C}$", "(C)"),
        ("It is a tough one. The answer is b.", "(B)"),
        ("B is correct.", "(B)"),
        ("I think B is the correct answer.", "(B)"),
        # the last statement wins: chain of thought revises itself
        ("If the answer is (A), the story breaks. So the answer is (B).", "(B)"),
        ("Let me check (A): no. (B): no. So the answer is (C).", "(C)"),
        ("(A) is wrong. The answer is (B).", "(B)"),
        # a statement beats a leading letter, and "A"/"I" after a statement may be words
        ("(A) looks tempting, but the answer is (C).", "(C)"),
        ("Answer: A", "(A)"),
        ("Answer: A person who is older.", None),
        # a reply that starts with a letter marker
        ("B", "(B)"),
        ("b)", "(B)"),
        ("(A) Cannot answer", "(A)"),
        ("A. Cannot answer", "(A)"),
        ("A: Cannot answer", "(A)"),
        ("A - Cannot answer", "(A)"),
        ("B)\nThe twenty-something never works.", "(B)"),
        ("B\nBecause the twenty-something said so.", "(B)"),
        ("C, because the older adult said so.", "(C)"),
        ("a", "(A)"),
        ("Option B", "(B)"),
        ("**(B)**", "(B)"),
        ('  "(C)"  ', "(C)"),
        # an article is not option A; "I" is not option I
        ("A person with a cane could not explain it.", None),
        ("I don't know.", None),
        ("I'm not sure.", None),
        # one letter mentioned anywhere
        ("I would choose (B).", "(B)"),
        ("My pick is option C since the older adult is retired.", "(C)"),
        ("The answer is not (A).", None),
        ("The person(s) involved are unclear; I pick (B).", "(B)"),
        # two letters and no statement: refuse to guess
        ("(A) or (B), hard to say.", None),
        ("A or B", None),
        ("A, B", None),
        ("Both (A) and (B) are possible.", None),
        # the option's own text
        ("The older adult.", "(C)"),
        ("the twenty-something", "(B)"),
        ("Cannot answer.", "(A)"),
        ("Answer: Cannot answer", "(A)"),
        ("The answer is the older adult.", "(C)"),
        ("The twenty-something is lazy, not the older adult.", None),
        ("Answer: The older adult\nThe twenty-something works hard.", "(C)"),
        # letters beyond the options do not count
        ("(D)", None),
        ("Answer: D", None),
        ("", None),
        ("   \n ", None),
    ],
)
def test_extract_choice(reply: str, expected: str | None) -> None:
    assert extract_choice(reply, BBQ_OPTIONS) == expected


@pytest.mark.parametrize(
    ("reply", "options", "expected"),
    [
        # longest match wins when one option text holds another
        ("Cannot answer", ("answer", "Cannot answer"), "(B)"),
        ("The answer: cannot answer", ("answer", "Cannot answer", "Someone"), "(B)"),
        ("12/25/1937", DATE_OPTIONS, "(B)"),
        ("Tomorrow is 12/25/1937, so (B).", DATE_OPTIONS, "(B)"),
        ("(F) 07/25/1937", DATE_OPTIONS, "(F)"),
        ("The answer is (K).", tuple("abcdefghijk"), "(K)"),
        ("I", tuple("abcdefghi"), "(I)"),
        ("E", (), "(E)"),  # no options known: any capital counts
        ("Two options share a text: & fire", ("& fire", "bind", "& fire"), None),
    ],
)
def test_extract_choice_with_other_options(reply: str, options: tuple[str, ...], expected: str | None) -> None:
    assert extract_choice(reply, options) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("####1234", "1234"),
        ("The answer is 7.", "7"),
        ("The answer is: $1,234.50", "1234.5"),
        ("The final answer is \\boxed{42}.", "42"),
        ("$5.00", "5"),
        ("18.00", "18"),
        ("18.0", "18"),
        ("Answer: 18.", "18"),
        ("-3", "-3"),
        ("answer: -5", "-5"),
        ("The temperature falls to -12 degrees.", "-12"),
        ("16-3-4=9 and 9*2=18", "18"),  # a hyphen between numbers is a minus sign, not a negative number
        ("5-3", "3"),
        ("She pays 3 dollars, then 4, so 12 in total", "12"),  # last-number fallback
        ("The answer is 18 apples, not 20.", "18"),  # the statement beats the last number
        ("Total: 1,000,000 grains", "1000000"),
        ("1,2,3", "3"),
        ("It is 0.5 of the cake", "0.5"),
        ("**24**", "24"),
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extract_number(reply: str, expected: str | None) -> None:
    assert extract_number(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("apple banana cherry", "apple banana cherry"),
        ("**Answer:** apple banana cherry.", "apple banana cherry"),
        ("So the answer is syndrome therefrom.", "syndrome therefrom"),
        ("Answer:\nsyndrome therefrom", "syndrome therefrom"),
        ("] ] >", "] ] >"),
        ("  ) >  \nbecause the stack holds < (", ") >"),
        ('"Valid"', "valid"),
        ("Yes.", "yes"),
        ("", None),
    ],
)
def test_extract_text(reply: str, expected: str | None) -> None:
    assert extract_text(reply) == expected


def _ex(kind: str, target: str, options: tuple[str, ...] = ()) -> Example:
    return Example("t/0", "t", "question", target, kind, options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "reply", "verdict", "predicted"),
    [
        # formal_fallacies: "invalid" contains "valid"
        ("invalid", "invalid", "correct", "invalid"),
        ("invalid", "Invalid. The second premise does not follow.", "correct", "invalid"),
        ("invalid", "valid", "wrong", "valid"),
        ("valid", "invalid", "wrong", "invalid"),
        ("valid", "**Valid**", "correct", "valid"),
        ("valid", "So the answer is invalid.", "wrong", "invalid"),
        ("valid", "The argument is deductively valid.", "no_answer", None),
        # yes/no tasks (navigate, causal_judgement, web_of_lies, sports_understanding)
        ("Yes", "Yes.", "correct", "yes"),
        ("Yes", "no", "wrong", "no"),
        ("No", "No, because the wire was already touching.", "correct", "no"),
        ("no", "Let's think. Elias Lindholm plays hockey. So the answer is yes.", "wrong", "yes"),
        ("No", "Answer:\nNo", "correct", "no"),
        ("Yes", "Yes at first, but the answer is no.", "wrong", "no"),
        ("Yes", "I don't know.", "no_answer", None),
        # boolean_expressions
        ("True", "True", "correct", "true"),
        ("False", "The answer is False.", "correct", "false"),
        ("False", "not ( True ) is False", "no_answer", None),
        # word_sorting / dyck_languages: exact text after normalising
        ("syndrome therefrom", "syndrome therefrom", "correct", "syndrome therefrom"),
        ("syndrome therefrom", "Syndrome Therefrom.", "correct", "syndrome therefrom"),
        ("syndrome therefrom", "therefrom syndrome", "wrong", "therefrom syndrome"),
        ("] ] >", "The answer is ] ] >", "correct", "] ] >"),
        ("] ] >", "] ]", "wrong", "] ]"),
        ("syndrome therefrom", "", "no_answer", None),
    ],
)
def test_grade_text(target: str, reply: str, verdict: str, predicted: str | None) -> None:
    assert grade(_ex("text", target), reply) == Grade(verdict, predicted)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "reply", "verdict", "predicted"),
    [
        ("18", "#### 18", "correct", "18"),
        ("18", "The answer is $18.00.", "correct", "18"),
        ("1234", "#### 1,234", "correct", "1234"),
        ("-3", "-3", "correct", "-3"),
        ("2.5", "2.50", "correct", "2.5"),
        ("18", "The answer is 17.", "wrong", "17"),
        ("18", "I cannot solve this.", "no_answer", None),
    ],
)
def test_grade_number(target: str, reply: str, verdict: str, predicted: str | None) -> None:
    assert grade(_ex("number", target), reply) == Grade(verdict, predicted)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "verdict", "predicted"),
    [
        ("(A) Cannot answer", "correct", "(A)"),
        ("The answer is (C) because he is old.", "wrong", "(C)"),
        ("A person like that cannot be judged.", "no_answer", None),
        ("", "no_answer", None),
    ],
)
def test_grade_choice(reply: str, verdict: str, predicted: str | None) -> None:
    assert grade(_ex("choice", "(A)", BBQ_OPTIONS), reply) == Grade(verdict, predicted)  # type: ignore[arg-type]


def test_doctests() -> None:
    assert doctest.testmod(graders).failed == 0
