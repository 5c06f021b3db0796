"""The range-checked argparse types of ``memslots.tools.cli.options``."""

from __future__ import annotations

import argparse

import pytest

from memslots.tools.cli.options import float_range, int_range


def test_int_range_accepts_its_bounds_and_refuses_the_rest() -> None:
    parse = int_range(4, 32764)
    assert parse("4") == 4
    assert parse(" 32764 ") == 32764
    for text, message in (
        ("3", "3: must be in 4..32764"),
        ("32765", "32765: must be in 4..32764"),
        ("-1", "-1: must be in 4..32764"),
        ("9" * 40, f"{'9' * 40}: must be in 4..32764"),
        ("abc", "not an integer: 'abc'"),
        ("1.5", "not an integer: '1.5'"),
    ):
        with pytest.raises(argparse.ArgumentTypeError) as info:
            parse(text)
        assert str(info.value) == message


def test_int_range_names_what_it_counts() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"^0: must be in 1\.\.64 \(threads\)$"):
        int_range(1, 64, what="threads")("0")


def test_float_range_refuses_nan_inf_and_out_of_range() -> None:
    parse = float_range(0.0, 60.0)
    assert parse("0") == 0.0
    assert parse("60") == 60.0
    assert parse("0.25") == 0.25
    for text in ("nan", "inf", "-inf", "-0.1", "60.5", "1e400"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be in 0\.\.60$"):
            parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^not a number: 'x'$"):
        parse("x")


def test_an_empty_range_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        int_range(2, 1)
    with pytest.raises(ValueError):
        float_range(1.0, 0.0)


def test_argparse_reports_the_range() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int_range(1, 3))
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"argument --n: 4: must be in 1\.\.3"):
        parser.parse_args(["--n", "4"])
