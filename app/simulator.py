"""Synthetic card transactions with labelled fraud, in the spirit of the Fraud Detection Handbook.

Customers and terminals live on a 100 x 100 grid; customers spend at terminals near home, mostly
in daytime, with amounts around their own mean. On top of the handbook's three fraud scenarios
(amount outliers, compromised terminals, compromised cards) it injects card-testing bursts and
account takeovers, so models and rules meet the patterns seen in production. Everything is
vectorised numpy driven by one `default_rng(seed)`: a seed always yields the same frames, and a
million rows take a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from app.sources import (
    CHANNELS,
    LABELS_SCHEMA,
    TRANSACTIONS_SCHEMA,
    labels_from_arrow,
    put_digits,
    strings_from_chars,
    transactions_from_arrow,
)

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
SCENARIOS: tuple[str, ...] = (
    "genuine",
    "amount_outlier",
    "compromised_terminal",
    "compromised_card",
    "card_testing",
    "account_takeover",
)
GENUINE, OUTLIER, TERMINAL, CARD, TESTING, TAKEOVER = range(len(SCENARIOS))

GRID_SIZE = 100.0
RADIUS = 5.0
OUTLIER_THRESHOLD = 220.0
COUNTRIES: tuple[str, ...] = (
    "BE", "NL", "FR", "DE", "LU", "GB", "ES", "IT", "PT", "PL", "RO", "US", "BR", "NG", "TR", "IN",
)  # fmt: skip
HOME_COUNTRY_WEIGHTS = np.array([0.90, 0.03, 0.03, 0.02, 0.01, 0.01])
NEIGHBOUR_COUNTRIES = 10  # genuine travel stays among the first ten countries
TRAVEL_SHARE = 0.01
POS_MCC: tuple[str, ...] = (
    "5411", "5812", "5814", "5541", "5912", "5311", "5691", "5942", "4111", "5999", "7011", "5732",
)  # fmt: skip
ECOM_MCC: tuple[str, ...] = ("5732", "5999", "5942", "5691", "4121", "7011", "5815", "5816", "4816")
ATM_MCC = "6011"
CHANNEL_WEIGHTS = np.array([0.75, 0.20, 0.05])  # pos, ecom, atm
POS, ECOM, ATM = range(len(CHANNELS))
IP_FIRST_OCTETS = np.array([31, 37, 46, 62, 77, 78, 81, 84, 85, 91, 94, 109, 141, 178, 185, 195])

_MS_PER_DAY = 86_400_000
_PAN_PREFIX = b"4000"
_PAN_BODY_DIGITS = 11
_PAN_STRIDE = 6_364_136_223  # coprime with 10**11, so card bodies never collide
_DEVICE_STRIDE = 0x9E3779B97F4B  # odd, so device ids are a bijection on 48 bits
_DEVICE_MASK = (1 << 48) - 1


@dataclass(frozen=True, slots=True)
class FraudRates:
    """How often each fraud scenario starts; the defaults give roughly 1-2 % fraud.

    Event rates are per entity per day, so they scale with the population simulated.
    """

    amount_outlier: float = 0.001  # share of genuine transactions turned into outliers
    compromised_terminals: float = 0.0003  # per terminal per day (handbook: 2 / 10k)
    terminal_window_days: float = 28.0
    compromised_cards: float = 0.0009  # per card per day (handbook: 3 / 5k)
    card_window_days: float = 14.0
    card_fraud_share: float = 1 / 3
    card_amount_factor: float = 5.0
    card_testing: float = 0.0003  # bursts per card per day
    account_takeover: float = 0.0005  # takeovers per card per day

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"FraudRates.{field.name} must be a finite number >= 0")
        if self.card_fraud_share > 1 or self.amount_outlier > 1:
            raise ValueError("FraudRates shares must be <= 1")


@dataclass(frozen=True, slots=True)
class _Customers:
    x: np.ndarray
    y: np.ndarray
    mean_amount: np.ndarray
    std_amount: np.ndarray
    tx_per_day: np.ndarray
    country: np.ndarray
    devices: np.ndarray  # 1 or 2; customer c owns device indices 2c and 2c + 1


@dataclass(frozen=True, slots=True)
class _Terminals:
    x: np.ndarray
    y: np.ndarray
    channel: np.ndarray
    mcc: np.ndarray  # index into _MCC_TABLE


@dataclass(frozen=True, slots=True)
class _Reach:
    """Terminals within RADIUS of each customer's home, as compressed rows (CSR)."""

    start: np.ndarray
    count: np.ndarray
    terminal: np.ndarray


@dataclass(frozen=True, slots=True)
class _Rows:
    """Transactions under construction; times are milliseconds since the simulation start."""

    customer: np.ndarray
    terminal: np.ndarray
    time_ms: np.ndarray
    amount: np.ndarray
    device: np.ndarray  # index into the device table, -1 for card-present transactions
    country: np.ndarray
    scenario: np.ndarray

    def take(self, index: np.ndarray) -> _Rows:
        return _Rows(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Rows)))


_MCC_TABLE: tuple[str, ...] = (ATM_MCC, *dict.fromkeys(POS_MCC + ECOM_MCC))


def simulate(
    customers: int,
    terminals: int,
    days: int,
    seed: int,
    start: datetime = DEFAULT_START,
    label_delay_days: float = 7.0,
    fraud: FraudRates | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Simulate `days` days of transactions; returns (transactions frame, labels frame)."""
    _check_arguments(customers, terminals, days, start, label_delay_days)
    rates = fraud or FraudRates()
    rng = np.random.default_rng(seed)
    people = _customer_profiles(rng, customers)
    shops = _terminal_profiles(rng, terminals)
    rows = _genuine_rows(rng, people, shops, _reachable(people, shops), days)
    _label_amount_outliers(rng, rows, people, rates)
    _label_compromised_terminals(rng, rows, terminals, days, rates)
    _label_compromised_cards(rng, rows, customers, days, rates)
    fraud_device = 2 * customers  # customer c owns devices 2c and 2c + 1
    testing = _card_testing_rows(rng, people, shops, days, rates, fraud_device)
    fraud_device = _next_device(testing, fraud_device)
    takeover = _takeover_rows(rng, people, shops, days, rates, fraud_device)
    rows = _Rows.concat([rows, testing, takeover])
    rows = rows.take(np.flatnonzero(rows.time_ms < days * _MS_PER_DAY))
    rows = rows.take(np.argsort(rows.time_ms, kind="stable"))
    return _frames(rng, rows, people, shops, seed, start, label_delay_days)


def _check_arguments(
    customers: int, terminals: int, days: int, start: datetime, label_delay_days: float
) -> None:
    if min(customers, terminals, days) < 1:
        raise ValueError("customers, terminals and days must all be >= 1")
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be a timezone-aware datetime")
    if not (np.isfinite(label_delay_days) and label_delay_days >= 0):
        raise ValueError("label_delay_days must be a finite number >= 0")


def _next_device(rows: _Rows, first: int) -> int:
    """First device index after those `rows` used, so every fraud event gets a fresh device."""
    return max(first, int(rows.device.max()) + 1) if rows.device.size else first


# --------------------------------------------------------------------------------------------
# Profiles.


def _customer_profiles(rng: np.random.Generator, count: int) -> _Customers:
    """Handbook-style customer profiles plus home country and devices."""
    mean_amount = rng.uniform(5, 100, count)
    return _Customers(
        x=rng.uniform(0, GRID_SIZE, count),
        y=rng.uniform(0, GRID_SIZE, count),
        mean_amount=mean_amount,
        std_amount=mean_amount / 2,
        tx_per_day=rng.uniform(0, 4, count),
        country=rng.choice(HOME_COUNTRY_WEIGHTS.size, size=count, p=HOME_COUNTRY_WEIGHTS),
        devices=rng.integers(1, 3, count),
    )


def _terminal_profiles(rng: np.random.Generator, count: int) -> _Terminals:
    """Terminals with a location, a channel and a merchant category fitting the channel."""
    channel = rng.choice(len(CHANNELS), size=count, p=CHANNEL_WEIGHTS)
    pos = np.array([_MCC_TABLE.index(code) for code in POS_MCC])
    ecom = np.array([_MCC_TABLE.index(code) for code in ECOM_MCC])
    mcc = np.select(
        [channel == POS, channel == ECOM],
        [pos[rng.integers(0, pos.size, count)], ecom[rng.integers(0, ecom.size, count)]],
        default=_MCC_TABLE.index(ATM_MCC),
    )
    return _Terminals(
        x=rng.uniform(0, GRID_SIZE, count),
        y=rng.uniform(0, GRID_SIZE, count),
        channel=channel,
        mcc=mcc,
    )


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges 0..count-1 for each count, without a Python loop."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if ends.size else 0) - np.repeat(ends - counts, counts)


def _reachable(people: _Customers, shops: _Terminals) -> _Reach:
    """Terminals within RADIUS of each home, found via a grid of RADIUS-sized cells; in
    chunks of customers, so the candidate pairs stay small (about customers x terminals /
    44 of them: 10 GB at once for 130k customers and 260k terminals)."""
    cells = int(np.ceil(GRID_SIZE / RADIUS))
    shop_cell = _cell(shops.x, cells) * cells + _cell(shops.y, cells)
    by_cell = np.argsort(shop_cell, kind="stable")
    per_cell = np.bincount(shop_cell, minlength=cells * cells)
    cell_start = np.cumsum(per_cell) - per_cell
    n = people.x.size
    step = max(1, _PAIRS_PER_CHUNK * cells * cells // (9 * max(1, shops.x.size)))
    chunks = [_near(people, shops, a, min(a + step, n), cells, by_cell, per_cell, cell_start)
              for a in range(0, n, step)]
    customer = np.concatenate([c for c, _ in chunks]) if chunks else np.empty(0, np.int64)
    terminal = np.concatenate([t for _, t in chunks]) if chunks else np.empty(0, np.int64)
    count = np.bincount(customer, minlength=n)
    return _Reach(start=np.cumsum(count) - count, count=count, terminal=terminal)


_PAIRS_PER_CHUNK = 20_000_000


def _near(people: _Customers, shops: _Terminals, a: int, b: int, cells: int,
          by_cell: np.ndarray, per_cell: np.ndarray, cell_start: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """(customer, terminal) pairs within RADIUS for customers a..b, customer-major."""
    shift = np.array([-1, 0, 1])
    near_x = _cell(people.x[a:b], cells)[:, None, None] + shift[None, :, None]
    near_y = _cell(people.y[a:b], cells)[:, None, None] + shift[None, None, :]
    inside = (near_x >= 0) & (near_x < cells) & (near_y >= 0) & (near_y < cells)
    owner = np.broadcast_to(np.arange(a, b)[:, None, None], inside.shape)[inside]
    cell = (near_x * cells + near_y)[inside]
    sizes = per_cell[cell]
    customer = np.repeat(owner, sizes)
    terminal = by_cell[np.repeat(cell_start[cell], sizes) + _ragged_arange(sizes)]
    close = (people.x[customer] - shops.x[terminal]) ** 2 + (
        people.y[customer] - shops.y[terminal]
    ) ** 2 <= RADIUS**2
    return customer[close], terminal[close]


def _cell(coordinate: np.ndarray, cells: int) -> np.ndarray:
    return np.clip((coordinate // RADIUS).astype(np.int64), 0, cells - 1)


# --------------------------------------------------------------------------------------------
# Genuine behaviour.


def _genuine_rows(
    rng: np.random.Generator, people: _Customers, shops: _Terminals, reach: _Reach, days: int
) -> _Rows:
    """Poisson counts per customer-day, daytime-centred times, nearby terminals."""
    per_day = rng.poisson(np.repeat(people.tx_per_day, days))
    slot = np.repeat(np.arange(per_day.size), per_day)
    customer, day = np.divmod(slot, days)
    rows = customer.size
    terminal = _nearby_terminals(rng, customer, reach, shops.x.size)
    ecom = shops.channel[terminal] == ECOM
    second_device = (rng.random(rows) < 0.5) & (people.devices[customer] == 2)
    device = np.where(ecom, 2 * customer + second_device, -1)
    return _Rows(
        customer=customer,
        terminal=terminal,
        time_ms=day * _MS_PER_DAY + _time_of_day_ms(rng, rows),
        amount=_genuine_amounts(rng, people, customer),
        device=device,
        country=_genuine_countries(rng, people.country[customer]),
        scenario=np.zeros(rows, dtype=np.int8),
    )


def _nearby_terminals(
    rng: np.random.Generator, customer: np.ndarray, reach: _Reach, terminals: int
) -> np.ndarray:
    """A uniformly chosen reachable terminal per row; any terminal if none is in reach."""
    count = reach.count[customer]
    pick = reach.start[customer] + (rng.random(customer.size) * count).astype(np.int64)
    fallback = rng.integers(0, terminals, customer.size)
    safe = np.minimum(pick, max(reach.terminal.size - 1, 0))
    near = reach.terminal[safe] if reach.terminal.size else fallback
    return np.where(count > 0, near, fallback)


def _time_of_day_ms(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Normal around noon (sd 20000 s, as the handbook); night draws spread uniformly."""
    seconds = rng.normal(43_200, 20_000, rows)
    night = rng.uniform(0, 86_400, rows)
    seconds = np.where((seconds >= 0) & (seconds < 86_400), seconds, night)
    return np.minimum((seconds * 1000).astype(np.int64), _MS_PER_DAY - 1)


def _genuine_amounts(
    rng: np.random.Generator, people: _Customers, customer: np.ndarray
) -> np.ndarray:
    """Normal around the customer's mean; negative draws resampled uniformly (handbook)."""
    mean = people.mean_amount[customer]
    amount = rng.normal(mean, people.std_amount[customer])
    amount = np.where(amount > 0, amount, rng.uniform(0, 2 * mean))
    return np.maximum(np.round(amount, 2), 0.01)


def _genuine_countries(rng: np.random.Generator, home: np.ndarray) -> np.ndarray:
    """Home country, except for a little travel to neighbouring countries."""
    travel = rng.random(home.size) < TRAVEL_SHARE
    return np.where(travel, _other_country(rng, home, NEIGHBOUR_COUNTRIES), home)


def _other_country(rng: np.random.Generator, home: np.ndarray, pool: int) -> np.ndarray:
    """A country among the first `pool` that differs from `home` (home is always < pool)."""
    return (home + 1 + rng.integers(0, pool - 1, home.size)) % pool


# --------------------------------------------------------------------------------------------
# Fraud scenarios on existing rows.


def _label_amount_outliers(
    rng: np.random.Generator, rows: _Rows, people: _Customers, rates: FraudRates
) -> None:
    """Turn a share of transactions into amounts above 220, scaled to the customer's spend."""
    chosen = rng.random(rows.customer.size) < rates.amount_outlier
    scale = rng.uniform(2, 10, rows.customer.size)
    outlier = np.round(OUTLIER_THRESHOLD + people.mean_amount[rows.customer] * scale, 2)
    rows.amount[chosen] = outlier[chosen]
    rows.scenario[chosen] = OUTLIER


def _compromise_events(
    rng: np.random.Generator, per_day: float, population: int, days: int
) -> tuple[np.ndarray, np.ndarray]:
    """(entity, start ms) of compromise events: Poisson per day, uniform time in the day."""
    count = rng.poisson(per_day * population, days)
    day = np.repeat(np.arange(days), count)
    entity = rng.integers(0, population, day.size)
    return entity, day * _MS_PER_DAY + rng.integers(0, _MS_PER_DAY, day.size)


def _in_window(
    entity: np.ndarray,
    time_ms: np.ndarray,
    event_entity: np.ndarray,
    event_start: np.ndarray,
    window_ms: int,
) -> np.ndarray:
    """Rows whose entity has an event starting in (time - window, time]."""
    if event_entity.size == 0:
        return np.zeros(entity.size, dtype=bool)
    _, rank = np.unique(np.concatenate([time_ms, event_start]), return_inverse=True)
    span = int(rank.max()) + 1
    row_key = entity * span + rank[: time_ms.size]
    event_key = event_entity * span + rank[time_ms.size :]
    order = np.argsort(event_key, kind="stable")
    found = np.searchsorted(event_key[order], row_key, side="right") - 1
    last = order[np.maximum(found, 0)]
    return (found >= 0) & (event_entity[last] == entity) & (time_ms - event_start[last] < window_ms)


def _label_compromised_terminals(
    rng: np.random.Generator, rows: _Rows, terminals: int, days: int, rates: FraudRates
) -> None:
    """Every genuine transaction at a compromised terminal within its window becomes fraud."""
    terminal, started = _compromise_events(rng, rates.compromised_terminals, terminals, days)
    window = int(rates.terminal_window_days * _MS_PER_DAY)
    hit = _in_window(rows.terminal, rows.time_ms, terminal, started, window)
    rows.scenario[hit & (rows.scenario == GENUINE)] = TERMINAL


def _label_compromised_cards(
    rng: np.random.Generator, rows: _Rows, customers: int, days: int, rates: FraudRates
) -> None:
    """A share of a compromised card's later transactions get inflated amounts and are fraud."""
    card, started = _compromise_events(rng, rates.compromised_cards, customers, days)
    window = int(rates.card_window_days * _MS_PER_DAY)
    hit = _in_window(rows.customer, rows.time_ms, card, started, window)
    chosen = hit & (rng.random(rows.customer.size) < rates.card_fraud_share)
    chosen &= rows.scenario == GENUINE
    rows.amount[chosen] = np.round(rows.amount[chosen] * rates.card_amount_factor, 2)
    rows.scenario[chosen] = CARD


# --------------------------------------------------------------------------------------------
# Injected fraud: new rows.


def _ecom_terminals(rng: np.random.Generator, shops: _Terminals, size: int) -> np.ndarray:
    """Random e-commerce terminals (any terminal if the population has none)."""
    ecom = np.flatnonzero(shops.channel == ECOM)
    pool = ecom if ecom.size else np.arange(shops.x.size)
    return pool[rng.integers(0, pool.size, size)]


def _card_testing_rows(
    rng: np.random.Generator,
    people: _Customers,
    shops: _Terminals,
    days: int,
    rates: FraudRates,
    first_device: int,
) -> _Rows:
    """Bursts of 5-15 tiny e-commerce payments a few seconds apart on one card."""
    card, started = _compromise_events(rng, rates.card_testing, people.x.size, days)
    size = rng.integers(5, 16, card.size)
    burst = np.repeat(np.arange(card.size), size)
    gaps = rng.integers(2_000, 30_000, burst.size)
    gaps[np.cumsum(size) - size] = 0
    offsets = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[np.cumsum(size) - size], size)
    country = rng.integers(0, len(COUNTRIES), card.size)
    return _Rows(
        customer=card[burst],
        terminal=_ecom_terminals(rng, shops, card.size)[burst],
        time_ms=started[burst] + offsets,
        amount=np.round(rng.uniform(0.5, 3.0, burst.size), 2),
        device=first_device + burst,
        country=country[burst],
        scenario=np.full(burst.size, TESTING, dtype=np.int8),
    )


def _takeover_rows(
    rng: np.random.Generator,
    people: _Customers,
    shops: _Terminals,
    days: int,
    rates: FraudRates,
    first_device: int,
) -> _Rows:
    """2-5 high-ish e-commerce payments within hours from a new device in a foreign country."""
    card, started = _compromise_events(rng, rates.account_takeover, people.x.size, days)
    size = rng.integers(2, 6, card.size)
    event = np.repeat(np.arange(card.size), size)
    offsets = rng.integers(0, 4 * 3_600_000, event.size)
    offsets = offsets[np.lexsort((offsets, event))]
    mean = people.mean_amount[card[event]]
    amount = mean * rng.uniform(2, 6, event.size) + rng.uniform(20, 80, event.size)
    country = _other_country(rng, people.country[card], len(COUNTRIES))
    return _Rows(
        customer=card[event],
        terminal=_ecom_terminals(rng, shops, event.size),
        time_ms=started[event] + offsets,
        amount=np.round(amount, 2),
        device=first_device + event,
        country=country[event],
        scenario=np.full(event.size, TAKEOVER, dtype=np.int8),
    )


# --------------------------------------------------------------------------------------------
# Luhn and identifiers.


def luhn_check_digits(payload: np.ndarray) -> np.ndarray:
    """Luhn check digit for each row of an (n, k) matrix of digits 0-9 (check digit excluded)."""
    digits = np.asarray(payload, dtype=np.int64)
    doubled = np.zeros(digits.shape[1], dtype=bool)
    doubled[::-1][::2] = True  # the rightmost payload digit is doubled
    values = np.where(doubled, digits * 2, digits)
    values = np.where(values > 9, values - 9, values)
    return (10 - values.sum(axis=1) % 10) % 10


def _card_numbers(rng: np.random.Generator, customers: int) -> pa.Array:
    """Unique test-BIN ("4000") 16-digit PANs with a valid Luhn check digit."""
    modulus = 10**_PAN_BODY_DIGITS
    body = (np.arange(customers, dtype=np.int64) * _PAN_STRIDE + rng.integers(0, modulus)) % modulus
    chars = np.empty((customers, 16), dtype=np.uint8)
    chars[:, :4] = np.frombuffer(_PAN_PREFIX, dtype=np.uint8)
    put_digits(chars, 4, body, _PAN_BODY_DIGITS)
    chars[:, 15] = luhn_check_digits(chars[:, :15] - ord("0")) + ord("0")
    return strings_from_chars(chars)


def _prefixed_ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """prefix + zero-padded number, e.g. C000042."""
    head = prefix.encode("ascii")
    chars = np.empty((numbers.size, len(head) + width), dtype=np.uint8)
    chars[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    put_digits(chars, len(head), numbers, width)
    return strings_from_chars(chars)


def _device_ids(rng: np.random.Generator, count: int) -> pa.Array:
    """Opaque unique 'dev-<12 hex>' ids: an odd-stride bijection on 48 bits."""
    offset = np.uint64(rng.integers(0, 1 << 48))
    raw = (np.arange(count, dtype=np.uint64) * np.uint64(_DEVICE_STRIDE) + offset) & np.uint64(
        _DEVICE_MASK
    )
    chars = np.empty((count, 16), dtype=np.uint8)
    chars[:, :4] = np.frombuffer(b"dev-", dtype=np.uint8)
    hex_digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    for position in range(12):
        nibble = (raw >> np.uint64(4 * (11 - position))) & np.uint64(15)
        chars[:, 4 + position] = hex_digits[nibble.astype(np.int64)]
    return strings_from_chars(chars)


def _ip_addresses(rng: np.random.Generator, count: int) -> pa.Array:
    """Public-looking IPv4 addresses, one per device."""
    octets = np.column_stack(
        [
            IP_FIRST_OCTETS[rng.integers(0, IP_FIRST_OCTETS.size, count)],
            rng.integers(0, 256, count),
            rng.integers(0, 256, count),
            rng.integers(1, 255, count),
        ]
    )
    text = octets.astype(str)
    dotted = np.strings.add(np.strings.add(text[:, 0], "."), text[:, 1])
    dotted = np.strings.add(np.strings.add(dotted, "."), text[:, 2])
    return pa.array(np.strings.add(np.strings.add(dotted, "."), text[:, 3]), type=pa.string())


def _id_width(count: int) -> int:
    return max(6, len(str(max(count - 1, 0))))


# --------------------------------------------------------------------------------------------
# Frames.


def _frames(
    rng: np.random.Generator,
    rows: _Rows,
    people: _Customers,
    shops: _Terminals,
    seed: int,
    start: datetime,
    label_delay_days: float,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Assemble contract frames from sorted rows (ids follow time order)."""
    count = rows.customer.size
    customers = people.x.size
    terminals = shops.x.size
    devices = max(2 * customers, int(rows.device.max()) + 1 if count else 0)
    start_ns = pd.Timestamp(start).tz_convert("UTC").value
    stamps_ns = start_ns + rows.time_ms * 1_000_000
    # `label_delay_days` is the latest a label arrives: genuine transactions are confirmed
    # then, fraud is reported sooner (cardholder disputes), after 20-100 % of the delay.
    delay_ns = int(np.ceil(label_delay_days * 86_400 * 10**9))
    fraud_share = rng.uniform(0.2, 1.0, count)
    early_ms = (fraud_share * delay_ns).astype(np.int64) // 1_000_000  # ms, as event times
    report_ns = np.where(rows.scenario != GENUINE, early_ms * 1_000_000, delay_ns)
    has_device = rows.device >= 0
    device_index = pa.array(rows.device, mask=~has_device)
    transaction_id = _prefixed_ids(f"tx-{seed}-", np.arange(count), 12)
    customer_id = _prefixed_ids("C", np.arange(customers), _id_width(customers))
    terminal_id = _prefixed_ids("T", np.arange(terminals), _id_width(terminals))
    stamps = pa.array(stamps_ns, type=pa.int64()).cast(TRANSACTIONS_SCHEMA.field("timestamp").type)
    columns = {
        "transaction_id": transaction_id,
        "timestamp": stamps,
        "customer_id": customer_id.take(pa.array(rows.customer)),
        "terminal_id": terminal_id.take(pa.array(rows.terminal)),
        "amount": pa.array(rows.amount, type=pa.float64()),
        "currency": pa.repeat(pa.scalar("EUR"), count),
        "card_number": _card_numbers(rng, customers).take(pa.array(rows.customer)),
        "merchant_category": pa.array(_MCC_TABLE).take(pa.array(shops.mcc[rows.terminal])),
        "channel": pa.array(CHANNELS).take(pa.array(shops.channel[rows.terminal])),
        "country": pa.array(COUNTRIES).take(pa.array(rows.country)),
        "device_id": _device_ids(rng, devices).take(device_index),
        "ip": _ip_addresses(rng, devices).take(device_index),
    }
    transactions = pa.table(columns, schema=TRANSACTIONS_SCHEMA)
    labels = pa.table(
        {
            "transaction_id": transaction_id,
            "customer_id": columns["customer_id"],
            "terminal_id": columns["terminal_id"],
            "timestamp": stamps,
            "is_fraud": pa.array(rows.scenario != GENUINE),
            "reported_at": pa.array(stamps_ns + report_ns).cast(stamps.type),
            "scenario": pa.array(SCENARIOS).take(pa.array(rows.scenario.astype(np.int64))),
        },
        schema=LABELS_SCHEMA,
    )
    return transactions_from_arrow(transactions, "simulator"), labels_from_arrow(
        labels, "simulator"
    )
