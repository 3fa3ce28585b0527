"""The fast paths of the schema validators accept and refuse exactly what the plain
implementations do (Luhn by digit loop, addresses by the ipaddress module)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from app.schemas import _IPV4, luhn_ok


def luhn_reference(digits: str) -> bool:
    if len(digits) < 2 or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def ipv4_reference(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


@given(st.text(alphabet="0123456789", min_size=0, max_size=25))
def test_luhn_equals_the_digit_loop(digits: str) -> None:
    assert luhn_ok(digits) == luhn_reference(digits)


@given(st.text(max_size=20))
def test_luhn_refuses_what_the_digit_loop_refuses(text: str) -> None:
    assert luhn_ok(text) == luhn_reference(text)


def test_luhn_known_numbers() -> None:
    valid = "40000000000" + "00115"  # generated: a test prefix and its check digit
    assert luhn_reference(valid) == luhn_ok(valid)
    good = next(valid[:-1] + d for d in "0123456789" if luhn_reference(valid[:-1] + d))
    assert luhn_ok(good) and luhn_ok("79927398713")  # the Luhn paper's own example
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    assert not luhn_ok(bad) and not luhn_ok("7") and not luhn_ok("١٢٣٤")


@given(st.lists(st.integers(0, 300), min_size=1, max_size=5),
       st.sampled_from(["", "0", "00", " ", "\n", "x"]))
def test_dotted_quad_fast_path_equals_ipaddress(parts: list[int], pad: str) -> None:
    for text in (".".join(map(str, parts)), pad + ".".join(map(str, parts)),
                 ".".join(map(str, parts)) + pad, ".".join(pad + str(p) for p in parts)):
        if _IPV4.fullmatch(text):
            assert ipv4_reference(text), text
        elif len(parts) == 4 and not pad and all(p <= 255 for p in parts):
            raise AssertionError(f"{text} should take the fast path")


@given(st.text(alphabet="0123456789.:abcdef%x ", max_size=20))
def test_dotted_quad_fast_path_never_accepts_what_ipaddress_refuses(text: str) -> None:
    if _IPV4.fullmatch(text):
        assert ipv4_reference(text), text
