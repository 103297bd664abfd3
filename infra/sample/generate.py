"""Deterministic sample rows: the same seed gives the same values, byte for byte, on every machine.

`rows` is both what the loader writes and what tests expect to read back (from the source, or from a
replication target). Values are Branchline's canonical Python values (see branchline.events):
Decimal with the column's scale, int (unsigned 64-bit included), str, bytes, bool for TINYINT(1) and
boolean, int for BIT and YEAR, list[str] for SET (declaration order) and text[], timedelta for TIME
and interval, naive datetime for DATETIME/timestamp, aware UTC datetime for TIMESTAMP/timestamptz,
date, uuid.UUID, and `Json` for JSON/jsonb.

Each table draws from its own random stream seeded with (seed, table), so one table's rows never
depend on another's; references between tables use ids known from the row counts alone. The first
rows of each table carry the edge values (extremes, emoji, negative TIME...), so any ``n`` >= 8
contains all of them.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeVar

from branchline.events import Json

from .tables import ENUM_VALUES, PRIMARY_KEYS, database_of

DEFAULT_SEED = 20240601
"""The seed used when none is given; tests and the demo rely on it being stable."""

Row = dict[str, Any]
_T = TypeVar("_T")

CN_PREFIX = ["华东", "上海", "深圳", "北京", "成都", "杭州", "广州", "武汉", "南京", "西安"]
CN_CORE = ["精密", "贸易", "科技", "物流", "电子", "食品", "机械", "纺织", "化工", "医药"]
CN_SUFFIX = ["有限公司", "股份有限公司", "集团", "商行", "工厂"]
CN_SURNAMES = ["王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周"]
CN_GIVEN = ["伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "艳"]
LATIN_FIRST = ["Anna", "José", "Søren", "Zoë", "Łukasz", "Chloé", "Mario", "Ingrid", "Dmitri", "Aoife"]
LATIN_LAST = ["Müller", "O'Brien", "García", "Ødegaard", "Nguyễn", "Smith", "D'Angelo", "Kowalski"]
LATIN_COMPANY = ["Acme", "Nordwind", "Blue Harbor", "Vértice", "Kraft & Söhne", "Orbis", "Q\"uoted Co"]
EMOJI = ["🚚", "📦", "🏭", "✅", "🔥", "👍🏽", "🇨🇳", "😀", "🧾", "👨‍👩‍👧", "𠀀"]
"""Emoji outside the BMP, a skin-tone modifier, a flag pair, a ZWJ family, and CJK Extension B."""
COUNTRIES = ["CN", "DE", "FR", "US", "BR", "JP", "VN", "PL", "IE", "NO"]
CITIES = ["上海", "深圳", "Hamburg", "São Paulo", "Kraków", "大阪", "Hà Nội", "Lyon"]
CURRENCIES = ["CNY", "EUR", "USD", "BRL", "JPY"]
INDUSTRIES = ["manufacturing", "retail", "logistics", "software", "healthcare", "energy"]
ACTIVITY_KINDS = ["call", "email", "meeting", "note", "task"]
TRICKY_TAGS = ["a,b", 'say "hi"', "back\\slash", "{brace}", "NULL", " padded ", "😀", "中文", ""]
"""text[] elements that need quoting in PostgreSQL's array syntax."""

BIG_BODY_EVERY = 16
"""Every 16th activity (and the first) has a body above 8 kB that PostgreSQL TOASTs."""
BIG_BODY_BYTES = 7_200
"""Random bytes behind each large body; base64 makes ~9.6 kB of text that pglz cannot shrink."""

U64_EDGES = [2**64 - 1, 2**63, 2**63 - 1, 0, 2**63 + 1, 1]
EPOCH = datetime(2015, 1, 1)
EPOCH_UTC = EPOCH.replace(tzinfo=UTC)
SPAN_SECONDS = 10 * 365 * 86_400


# ---- row counts ---------------------------------------------------------------------------------

def count(table: str, n: int) -> int:
    """Rows of ``table`` in a sample of size ``n`` (rows in the main tables; the others scale)."""
    if n < 0:
        raise ValueError(f"`rows` must be >= 0; got {n!r}")
    if table == "order_lines":
        return n + 3 * (n // 3) + (0, 1, 3)[n % 3]  # sum of _lines_of(1..n): 1 + i % 3 cycles 2, 3, 1
    scale = _SCALE[table]
    return max(min(n, scale[1]), n * scale[0] // 1000)


_SCALE: dict[str, tuple[int, int]] = {
    # table: (rows per 1000 main rows, minimum when n allows it)
    "customers": (1000, 1),
    "products": (250, 8),
    "warehouses": (2, 3),
    "sales_orders": (1000, 1),
    "invoices": (500, 1),
    "stock_movements": (1000, 1),
    "legacy_price_list": (500, 8),
    "accounts": (1000, 1),
    "contacts": (1000, 1),
    "opportunities": (500, 1),
    "activities": (1000, 1),
}


def _lines_of(order_id: int) -> int:
    return 1 + order_id % 3


# ---- small helpers ------------------------------------------------------------------------------

class _Rand:
    """A seeded stream with cheap draws: `random.Random`'s randrange/choice are pure Python and cost
    more than the rest of a row; these use the C-level random()/getrandbits() directly."""

    __slots__ = ("getrandbits", "randbytes", "random", "sample")

    def __init__(self, seed: int, table: str) -> None:
        source = random.Random(f"{seed}:{table}")
        self.random = source.random
        self.getrandbits = source.getrandbits
        self.randbytes = source.randbytes
        self.sample = source.sample

    def below(self, k: int) -> int:
        """An int in [0, k); k < 2**53."""
        return int(self.random() * k)

    def between(self, low: int, high: int) -> int:
        """An int in [low, high], both included."""
        return low + int(self.random() * (high - low + 1))

    def pick(self, seq: Sequence[_T]) -> _T:
        return seq[int(self.random() * len(seq))]


def _rng(seed: int, table: str) -> _Rand:
    return _Rand(seed, table)


def _money(rng: _Rand, high: int, scale: int = 4) -> Decimal:
    """A Decimal with exactly ``scale`` digits after the point, below ``high``."""
    return Decimal(rng.below(high * 10**scale)).scaleb(-scale)


def _stamp(rng: _Rand, micros: bool = True) -> datetime:
    return EPOCH + timedelta(0, rng.below(SPAN_SECONDS), rng.below(1_000_000) if micros else 0)


def _utc(rng: _Rand, micros: bool = True) -> datetime:
    return EPOCH_UTC + timedelta(0, rng.below(SPAN_SECONDS), rng.below(1_000_000) if micros else 0)


def _company(rng: _Rand, i: int) -> str:
    style = i % 4
    if style == 0:
        return rng.pick(CN_PREFIX) + rng.pick(CN_CORE) + rng.pick(CN_SUFFIX)
    if style == 1:
        return f"{rng.pick(LATIN_COMPANY)} {rng.pick(LATIN_LAST)} GmbH"
    if style == 2:
        return f"{rng.pick(CN_CORE)}{rng.pick(LATIN_COMPANY)} {rng.pick(EMOJI)}"
    return f"{rng.pick(LATIN_COMPANY)} Trading #{i}"


def _person(rng: _Rand, i: int) -> tuple[str, str]:
    if i % 3 == 0:
        return rng.pick(CN_GIVEN), rng.pick(CN_SURNAMES)
    return rng.pick(LATIN_FIRST), rng.pick(LATIN_LAST)


def _subset(rng: _Rand, values: tuple[str, ...]) -> list[str]:
    return [v for v in values if rng.random() < 0.25]


def _bytes(rng: _Rand, low: int, high: int) -> bytes:
    return rng.randbytes(rng.between(low, high))


def account_id(seed: int, index: int) -> uuid.UUID:
    """The uuid of the ``index``-th sample account (1-based), computable without the other rows."""
    digest = hashlib.blake2b(f"{seed}:account:{index}".encode(), digest_size=16).digest()
    return uuid.UUID(bytes=digest, version=4)


@lru_cache(maxsize=4)
def _account_ids(seed: int, accounts: int) -> tuple[uuid.UUID, ...]:
    """All account uuids, computed once for the three tables that refer to them."""
    return tuple(account_id(seed, i) for i in range(1, accounts + 1))


def big_body(rng: _Rand, i: int) -> str:
    """An e-mail with an inline attachment: > 8 kB of text that compresses poorly, so it is TOASTed."""
    blob = base64.b64encode(rng.randbytes(BIG_BODY_BYTES)).decode()
    lines = "\n".join(blob[k:k + 76] for k in range(0, len(blob), 76))
    return f"转发的邮件 #{i} 📎\nContent-Transfer-Encoding: base64\n\n{lines}\n"


def _references(n: int, table: str) -> int:
    """How many rows a referenced table has: its ids are 1..count."""
    return count(table, n)


# ---- ERP ----------------------------------------------------------------------------------------

def _customers(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "customers")
    segments, tags = ENUM_VALUES[("customers", "segment")], ENUM_VALUES[("customers", "tags")]
    edges: dict[int, Row] = {
        1: {"name": "上海精密机械有限公司 🏭", "credit_limit": Decimal("99999999999999.9999"), "flags": 0b1111111111,
            "tags": list(tags), "birth_date": date(1000, 1, 1)},
        2: {"name": "Kraft & Söhne O'Brien 👨‍👩‍👧 𠀀", "credit_limit": Decimal("-99999999999999.9999"), "flags": 0,
            "tags": [], "birth_date": date(9999, 12, 31),
            "attributes": Json({"note": "emoji 😀 and 中文", "nested": {"list": [1, 2.5, None, True]},
                                "big": 2**64 - 1})},
        3: {"credit_limit": Decimal("0.0001"), "email": None, "attributes": None,
            "updated_at": datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)},
        4: {"updated_at": datetime(2038, 1, 19, 3, 14, 7, tzinfo=UTC), "created_at": datetime(1000, 1, 1)},
        5: {"created_at": datetime(9999, 12, 31, 23, 59, 59, 999_999)},
    }
    for i in range(1, count("customers", n) + 1):
        name = _company(rng, i)
        row: Row = {
            "id": i,
            "code": f"C{i:07d}",
            "name": name,
            "email": f"buyer{i}@example.com" if rng.random() < 0.9 else None,
            "country": rng.pick(COUNTRIES),
            "segment": rng.pick(segments),
            "tags": _subset(rng, tags),
            "credit_limit": _money(rng, 10_000_000),
            "is_active": rng.random() < 0.9,
            "flags": rng.getrandbits(10),
            "birth_date": date(1950, 1, 1) + timedelta(days=rng.below(20_000)) if rng.random() < 0.3 else None,
            "attributes": Json({"tier": rng.between(1, 5), "rep": rng.pick(CN_SURNAMES)})
            if rng.random() < 0.7 else None,
            "created_at": _stamp(rng),
            "updated_at": _utc(rng, micros=False),
        }
        if i in edges:
            row.update(edges[i])
        yield row


def _products(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "products")
    categories = ENUM_VALUES[("products", "category")]
    for i in range(1, count("products", n) + 1):
        row: Row = {
            "id": i,
            "sku": f"SKU-{i:06d}",
            "name": f"{rng.pick(CN_CORE)}零件 {rng.pick(LATIN_COMPANY)} {rng.pick(EMOJI)}",
            "category": rng.pick(categories),
            "unit_price": _money(rng, 100_000),
            "external_id": U64_EDGES[i - 1] if i <= len(U64_EDGES) else rng.getrandbits(64),
            "is_active": rng.random() < 0.95,
            "image": _bytes(rng, 1, 96) if rng.random() < 0.5 else None,
            "specs": Json({"weight_kg": rng.between(1, 5000) / 100, "color": rng.pick(["红", "blue", "✨"])}),
            "created_at": _stamp(rng),
        }
        if i == 1:
            row["image"] = b""
        elif i == 2:
            row["image"] = b"\x00\xff\x00'\"\\\n\r\x1a" + bytes(range(256))
        yield row


def _warehouses(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "warehouses")
    for i in range(1, count("warehouses", n) + 1):
        opens = timedelta(hours=rng.between(5, 9))
        row: Row = {
            "id": i,
            "code": f"WH{i:04d}",
            "name": f"{rng.pick(CN_PREFIX)}{i}号仓库",
            "city": rng.pick(CITIES),
            "opened": rng.between(1990, 2024),
            "is_active": True,
            "opens_at": opens,
            # A night shift closes "after midnight": TIME above 24 h, as legacy schedulers store it.
            "closes_at": opens + timedelta(hours=rng.between(8, 22)),
        }
        if i == 1:
            row.update(opened=1901, opens_at=timedelta(hours=-2), closes_at=timedelta(hours=838, minutes=59, seconds=59))
        elif i == 2:
            row.update(opened=2155, is_active=False, opens_at=timedelta(0), closes_at=timedelta(hours=-838, minutes=-59, seconds=-59))
        yield row


def _sales_orders(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "sales_orders")
    statuses = ENUM_VALUES[("sales_orders", "status")]
    customers, warehouses = _references(n, "customers"), _references(n, "warehouses")
    for i in range(1, count("sales_orders", n) + 1):
        ordered = _stamp(rng)
        row: Row = {
            "id": i,
            "order_no": f"SO-{i:09d}",
            "customer_id": rng.between(1, customers),
            "warehouse_id": rng.between(1, warehouses),
            "status": rng.pick(statuses),
            "ordered_at": ordered,
            "promised_date": (ordered + timedelta(days=rng.between(1, 60))).date() if rng.random() < 0.8 else None,
            "total": _money(rng, 1_000_000),
            "currency": rng.pick(CURRENCIES),
            "note": rng.pick([None, "加急 🔥", "Bitte liefern Sie vor 10 Uhr", "call before delivery ☎️"]),
            "updated_at": _utc(rng, micros=False),
        }
        if i == 1:
            row.update(ordered_at=datetime(1000, 1, 1), promised_date=date(1000, 1, 1),
                       total=Decimal("99999999999999.9999"))
        elif i == 2:
            row.update(ordered_at=datetime(9999, 12, 31, 23, 59, 59, 999_999), promised_date=date(9999, 12, 31),
                       note="x" * 500)
        elif i == 3:
            row.update(note="line one\nline two\r\n\\ \"double\" 'single' \x1a \t end; -- not a comment")
        yield row


def _order_lines(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "order_lines")
    products = _references(n, "products")
    hundred = Decimal(100)
    for order_id in range(1, n + 1):
        for line_no in range(1, _lines_of(order_id) + 1):
            quantity, price = _money(rng, 1000), _money(rng, 10_000)
            discount = Decimal(rng.pick([0, 0, 0, 500, 1000, 2550])).scaleb(-2)
            total = (quantity * price * (hundred - discount) / hundred).quantize(Decimal("0.0001"))
            yield {"order_id": order_id, "line_no": line_no, "product_id": rng.between(1, products),
                   "quantity": quantity, "unit_price": price, "discount_pct": discount, "line_total": total}


def _invoices(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "invoices")
    for i in range(1, count("invoices", n) + 1):
        issued = date(2015, 1, 1) + timedelta(days=rng.below(3650))
        amount = _money(rng, 1_000_000)
        yield {
            "id": i,
            "order_id": min(2 * i, n),
            "invoice_no": f"INV-{issued.year}-{i:08d}",
            "fiscal_year": issued.year,
            "issued_on": issued,
            "due_on": issued + timedelta(days=rng.pick([14, 30, 60])),
            "amount": amount,
            "tax": (amount * Decimal("0.13")).quantize(Decimal("0.0001")),
            "paid": rng.random() < 0.6,
            "pdf": b"%PDF-1.4\n" + _bytes(rng, 0, 200) if rng.random() < 0.4 else None,
            "payload": Json({"buyer_tax_id": f"91310000{rng.below(10**10):010d}", "lines": rng.between(1, 3),
                             "remark": rng.pick(["增值税专用发票", "e-invoice ✅", ""])}),
        }


def _stock_movements(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "stock_movements")
    kinds, reasons = ENUM_VALUES[("stock_movements", "kind")], ENUM_VALUES[("stock_movements", "reason_codes")]
    products, warehouses = _references(n, "products"), _references(n, "warehouses")
    for i in range(1, count("stock_movements", n) + 1):
        kind = rng.pick(kinds)
        quantity = _money(rng, 10_000)
        row: Row = {
            "id": i,
            "product_id": rng.between(1, products),
            "warehouse_id": rng.between(1, warehouses),
            "kind": kind,
            "quantity": -quantity if kind == "issue" else quantity,
            "moved_at": _stamp(rng),
            "recorded_at": _utc(rng),
            "transit_time": timedelta(seconds=rng.below(200 * 3600)) if kind == "transfer" else None,
            # Difference between the scanner's clock and the server's: negative about half the time.
            "clock_offset": timedelta(microseconds=rng.below(7_200_000_000) - 3_600_000_000),
            "tracking_hash": U64_EDGES[i - 1] if i <= len(U64_EDGES) else rng.getrandbits(64),
            "reason_codes": _subset(rng, reasons) if kind == "adjustment" else [],
        }
        if i == 1:
            row.update(clock_offset=-timedelta(hours=838, minutes=59, seconds=59), transit_time=timedelta(hours=838, minutes=59, seconds=59))
        elif i == 2:
            row.update(clock_offset=timedelta(microseconds=-1), reason_codes=list(reasons))
        elif i == 3:
            row.update(clock_offset=-timedelta(hours=25, microseconds=123_456), transit_time=timedelta(0))
        yield row


def _legacy_price_list(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "legacy_price_list")
    products = _references(n, "products")
    previous: Row | None = None
    for i in range(1, count("legacy_price_list", n) + 1):
        if previous is not None and i % 7 == 0:
            yield dict(previous)  # the old system imported some price lines twice
            continue
        start = date(2000, 1, 1) + timedelta(days=rng.below(8000))
        row: Row = {
            "sku": f"SKU-{rng.between(1, products):06d}",
            "price": _money(rng, 100_000),
            "currency": rng.pick(CURRENCIES),
            "valid_from": start,
            "valid_to": start + timedelta(days=rng.between(30, 720)) if rng.random() < 0.7 else None,
            "changed_by": rng.pick(["ADMIN", "批处理", "j.müller", None]),
            "remark": rng.pick([None, "", "imported 2009", "价格调整 📈"]),
        }
        previous = row
        yield row


# ---- CRM ----------------------------------------------------------------------------------------

def _accounts(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "accounts")
    for i in range(1, count("accounts", n) + 1):
        created = _utc(rng)
        name = _company(rng, i)
        row: Row = {
            "id": account_id(seed, i),
            "name": name,
            "domain": f"account{i}.example.com" if rng.random() < 0.8 else None,
            "industry": rng.pick(INDUSTRIES),
            "annual_revenue": _money(rng, 10**9, 2) if rng.random() < 0.8 else None,
            "employees": rng.between(1, 200_000) if rng.random() < 0.8 else None,
            "tags": [rng.pick(["key", "partner", "churn-risk", "重点客户", "⭐"]) for _ in range(rng.between(0, 3))],
            "is_customer": rng.random() < 0.5,
            "profile": Json({"source": rng.pick(["web", "trade fair", "推荐"]), "score": rng.between(0, 100),
                             "owner": {"name": rng.pick(LATIN_FIRST), "team": rng.between(1, 9)}})
            if rng.random() < 0.8 else None,
            "logo": _bytes(rng, 8, 64) if rng.random() < 0.3 else None,
            "created_at": created,
            "updated_at": created + timedelta(seconds=rng.below(10**7), microseconds=rng.below(10**6)),
        }
        if i == 1:
            row.update(name="华东精密 🚚 O'Brien \"Quoted\" \\ back", tags=list(TRICKY_TAGS),
                       annual_revenue=Decimal("999999999999999999.99"), logo=b"\x00\\x00\\\\\r\n\t" + bytes(range(256)))
        elif i == 2:
            row.update(tags=[], profile=Json({"empty": {}, "list": [], "unicode": "👍🏽𠀀", "n": -1.5e-7}),
                       annual_revenue=Decimal("-0.01"), logo=b"")
        elif i == 3:
            row.update(created_at=datetime(1900, 1, 1, tzinfo=UTC), updated_at=datetime(2199, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC))
        yield row


def _contacts(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "contacts")
    accounts = _references(n, "accounts")
    account_ids = _account_ids(seed, accounts)
    for i in range(1, count("contacts", n) + 1):
        first, last = _person(rng, i)
        yield {
            "id": i,
            "account_id": account_ids[rng.below(accounts)],
            "first_name": first,
            "last_name": last,
            "email": f"contact{i}@example.org" if rng.random() < 0.85 else None,
            "phone": rng.pick([None, f"+86 21 {rng.below(10**8):08d}", f"+49 40 {rng.below(10**7):07d}"]),
            "birthday": date(1940, 1, 1) + timedelta(days=rng.below(25_000)) if rng.random() < 0.4 else None,
            "opted_in": rng.pick([True, False, None]),
            "tags": TRICKY_TAGS[:4] if i == 1 else (None if rng.random() < 0.3 else ["newsletter"] * rng.between(0, 2)),
            "preferences": Json({"language": rng.pick(["zh-CN", "de", "en"]), "channels": ["email", "微信"]})
            if rng.random() < 0.6 else None,
            "last_seen": _stamp(rng) if i != 2 else datetime(1, 1, 1, 0, 0, 0, 1),
            "created_at": _utc(rng),
        }


def _opportunities(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "opportunities")
    stages = ENUM_VALUES[("opportunities", "stage")]
    accounts, contacts = _references(n, "accounts"), _references(n, "contacts")
    account_ids = _account_ids(seed, accounts)
    for i in range(1, count("opportunities", n) + 1):
        created = _utc(rng)
        stage = rng.pick(stages)
        closed = stage in ("won", "lost")
        row: Row = {
            "id": i,
            "account_id": account_ids[rng.below(accounts)],
            "contact_id": rng.between(1, contacts) if rng.random() < 0.8 else None,
            "title": f"{rng.pick(CN_CORE)} deal {i} {rng.pick(EMOJI)}",
            "stage": stage,
            "amount": Decimal(rng.below(10**12)).scaleb(-rng.between(0, 6)) if rng.random() < 0.9 else None,
            "probability": Decimal(rng.below(10_001)).scaleb(-4),
            "expected_close": (created + timedelta(days=rng.between(7, 365))).date(),
            "sales_cycle": timedelta(days=rng.between(0, 400), seconds=rng.below(86_400),
                                     microseconds=rng.below(10**6)) if rng.random() < 0.8 else None,
            "details": Json({"competitors": rng.sample(["SAP", "Oracle", "用友", "金蝶"], rng.between(0, 2)),
                             "discount": rng.between(0, 30)}),
            "created_at": created,
            "closed_at": created + timedelta(days=rng.between(1, 300)) if closed else None,
        }
        if i == 1:
            row.update(amount=Decimal("123456789012345678901234567890.123456789012345"),
                       sales_cycle=-timedelta(days=3, hours=4, microseconds=5), expected_close=date(1, 1, 1))
        elif i == 2:
            row.update(amount=Decimal("-0.000000000000000001"), sales_cycle=timedelta(days=9999, microseconds=999_999),
                       expected_close=date(9999, 12, 31))
        yield row


def _activities(n: int, seed: int) -> Iterator[Row]:
    rng = _rng(seed, "activities")
    accounts, contacts, opportunities = (_references(n, t) for t in ("accounts", "contacts", "opportunities"))
    account_ids = _account_ids(seed, accounts)
    for i in range(1, count("activities", n) + 1):
        occurred = _utc(rng)
        kind = rng.pick(ACTIVITY_KINDS)
        if i % BIG_BODY_EVERY == 1:
            body: str | None = big_body(rng, i)
        else:
            body = rng.pick([None, "Left a voicemail.", "客户要求报价 📄", "Follow-up next week; see thread."])
        yield {
            "id": i,
            "account_id": account_ids[rng.below(accounts)],
            "contact_id": rng.between(1, contacts) if rng.random() < 0.7 else None,
            "opportunity_id": rng.between(1, opportunities) if rng.random() < 0.4 else None,
            "kind": kind,
            "subject": f"{kind} #{i} {rng.pick(['回访', 'demo', 'Angebot', '🔔'])}",
            "body": body,
            "duration": timedelta(seconds=rng.below(7200)) if kind in ("call", "meeting") else None,
            "done": rng.random() < 0.7,
            "attachment": b"\x89PNG\r\n\x1a\n" + _bytes(rng, 0, 48) if rng.random() < 0.1 else None,
            "occurred_at": occurred,
            "updated_at": occurred + timedelta(minutes=rng.below(10_000)),
        }


GENERATORS: dict[str, Callable[[int, int], Iterator[Row]]] = {
    "customers": _customers,
    "products": _products,
    "warehouses": _warehouses,
    "sales_orders": _sales_orders,
    "order_lines": _order_lines,
    "invoices": _invoices,
    "stock_movements": _stock_movements,
    "legacy_price_list": _legacy_price_list,
    "accounts": _accounts,
    "contacts": _contacts,
    "opportunities": _opportunities,
    "activities": _activities,
}


def rows(table: str, n: int, seed: int = DEFAULT_SEED) -> Iterator[Row]:
    """The rows of ``table`` in a sample of size ``n``, in primary-key order of generation.

    Deterministic: the same (table, n, seed) yields equal values on every call and machine.
    """
    database_of(table)  # raises a clear KeyError for unknown tables
    if table not in PRIMARY_KEYS:
        raise KeyError(table)
    return GENERATORS[table](n, seed)
