"""A live business workload on the sample databases: inserts, updates and deletes in multi-statement
transactions, paced to a rate, so that CDC has something realistic to capture.

ERP (MariaDB): new orders with lines and stock issues, status changes that raise invoices, price and
customer edits (emoji, SET, JSON, unsigned values above 2^63), cancellations that delete an order
with its lines and invoices, and updates/deletes on the key-less legacy table.
CRM (PostgreSQL): new accounts with contacts, activities with large bodies, updates that leave the
TOASTed ``activities.body`` unchanged (the case CDC readers get wrong) and some that rewrite it,
opportunity stage changes, and deletes of contacts, opportunities and activities with their children.

Ids come from the databases (AUTO_INCREMENT, identity, uuid4), so several workloads and other
writers can run at once without colliding. What each run did is returned as a `ChurnReport`; its
in-memory bookkeeping changes only after a commit, so rolled-back transactions leave no trace.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pymysql
from branchline.errors import InfraError
from psycopg import errors as pg_errors

from . import generate as g
from .connect import Endpoint, crm_connect, endpoint, erp_connect
from .generate import DEFAULT_SEED
from .loader import mysql_time
from .tables import ENUM_VALUES

_MARIADB_RETRYABLE = {1205, 1213}  # lock wait timeout, deadlock
CHURN_APPLICATION = "branchline-sample-churn"
"""PostgreSQL application_name of the workload's sessions (to find them in pg_stat_activity)."""


@dataclass
class ChurnReport:
    """What one database's workload committed. ``counts`` has insert/update/delete (rows affected),
    transactions, rollbacks, and for the CRM toast_unchanged / toast_changed (updates of activities
    rows with a large body that left it alone / rewrote it)."""

    database: str
    counts: Counter[str] = field(default_factory=Counter)
    by_table: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Rows affected per (table, op)."""
    inserted: dict[str, set[Hashable]] = field(default_factory=dict)
    """Primary keys inserted, per table (the key-less legacy table is not tracked)."""
    deleted: dict[str, set[Hashable]] = field(default_factory=dict)
    """Primary keys deleted, per table."""
    seconds: float = 0.0

    @property
    def changes(self) -> int:
        return self.counts["insert"] + self.counts["update"] + self.counts["delete"]

    def summary(self) -> str:
        extra = "".join(f" {k}={self.counts[k]}" for k in ("toast_unchanged", "toast_changed", "rollbacks",
                                                            "reconnects", "in_doubt") if k in self.counts)
        rate = self.changes / self.seconds if self.seconds else 0.0
        return (f"{self.database}: {self.counts['transactions']} transactions, insert={self.counts['insert']} "
                f"update={self.counts['update']} delete={self.counts['delete']}{extra} "
                f"in {self.seconds:.1f}s ({rate:.0f} changes/s)")


class _Pool:
    """Live keys of one table: O(1) random pick, add and remove."""

    def __init__(self, keys: list[Any]) -> None:
        self.keys = list(keys)
        self.index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def pick(self, rng: g._Rand) -> Any | None:
        return rng.pick(self.keys) if self.keys else None

    def add(self, key: Any) -> None:
        if key not in self.index:
            self.index[key] = len(self.keys)
            self.keys.append(key)

    def remove(self, key: Any) -> None:
        i = self.index.pop(key, None)
        if i is None:
            return
        last = self.keys.pop()
        if i < len(self.keys):
            self.keys[i] = last
            self.index[last] = i


class _Txn:
    """Bookkeeping of one transaction, applied to the pools and the report only after COMMIT."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.by_table: Counter[tuple[str, str]] = Counter()
        self.inserted: list[tuple[str, Hashable]] = []
        self.deleted: list[tuple[str, Hashable]] = []

    def insert(self, table: str, key: Hashable | None, rowcount: int = 1) -> None:
        self.counts["insert"] += rowcount
        self.by_table[table, "insert"] += rowcount
        if key is not None:
            self.inserted.append((table, key))

    def update(self, table: str, rowcount: int) -> None:
        self.counts["update"] += max(rowcount, 0)
        self.by_table[table, "update"] += max(rowcount, 0)

    def delete(self, table: str, keys: list[Hashable], rowcount: int | None = None) -> None:
        deleted = len(keys) if rowcount is None else max(rowcount, 0)
        self.counts["delete"] += deleted
        self.by_table[table, "delete"] += deleted
        self.deleted.extend((table, k) for k in keys)


class _Workload:
    """One database's transaction mix; subclasses define the transactions and their weights."""

    database = ""

    def __init__(self, conn: Any, seed: int, report: ChurnReport | None = None, attempt: int = 0) -> None:
        self.conn = conn
        self.rng = g._Rand(seed, f"churn:{self.database}:{attempt}" if attempt else f"churn:{self.database}")
        self.pools: dict[str, _Pool] = {}
        self.report = report or ChurnReport(self.database)
        self.mix: list[tuple[Callable[[_Txn], None], int]] = []

    def _choose(self) -> Callable[[_Txn], None]:
        total = sum(w for _, w in self.mix)
        point = self.rng.random() * total
        for step, weight in self.mix:
            point -= weight
            if point < 0:
                return step
        return self.mix[-1][0]

    def retryable(self, exc: Exception) -> bool:
        raise NotImplementedError

    def step(self) -> int:
        """Run one transaction; return the rows it changed (0 if it rolled back).

        A lost connection propagates; if it was lost during COMMIT the outcome is unknown, counted
        as ``in_doubt`` and left out of the keys (the rows may or may not exist)."""
        txn = _Txn()
        committing = False
        try:
            self._choose()(txn)
            committing = True
            self.conn.commit()
        except Exception as exc:
            if connection_lost(exc):
                if committing:
                    self.report.counts["in_doubt"] += 1
                raise
            self.conn.rollback()
            if not self.retryable(exc):
                raise
            self.report.counts["rollbacks"] += 1
            return 0
        self._apply(txn)
        return txn.counts["insert"] + txn.counts["update"] + txn.counts["delete"]

    def _apply(self, txn: _Txn) -> None:
        report = self.report
        report.counts.update(txn.counts)
        report.by_table.update(txn.by_table)
        report.counts["transactions"] += 1
        for table, key in txn.inserted:
            report.inserted.setdefault(table, set()).add(key)
            if table in self.pools:
                self.pools[table].add(key)
        for table, key in txn.deleted:
            report.deleted.setdefault(table, set()).add(key)
            if table in self.pools:
                self.pools[table].remove(key)
        self.after_commit(txn)

    def after_commit(self, txn: _Txn) -> None:
        """Hook for pools that are not plain tables."""


# ---- ERP ----------------------------------------------------------------------------------------

class ErpWorkload(_Workload):
    database = "erp"

    def __init__(self, conn: pymysql.Connection, seed: int, report: ChurnReport | None = None, attempt: int = 0) -> None:
        super().__init__(conn, seed, report, attempt)
        with conn.cursor() as cur:
            for table in ("customers", "products", "warehouses", "sales_orders", "stock_movements"):
                cur.execute(f"SELECT id FROM `{table}`")
                self.pools[table] = _Pool([r[0] for r in cur.fetchall()])
        conn.commit()
        self.mix = [(self.new_order, 30), (self.advance_order, 25), (self.edit_master_data, 15),
                    (self.cancel_order, 10), (self.move_stock, 12), (self.touch_legacy, 8)]

    def retryable(self, exc: Exception) -> bool:
        return isinstance(exc, pymysql.err.OperationalError) and exc.args[0] in _MARIADB_RETRYABLE

    def _exec(self, query: str, args: Any = None) -> tuple[int, int]:
        with self.conn.cursor() as cur:
            rowcount = cur.execute(query, args)
            return rowcount, cur.lastrowid

    def _fetch(self, query: str, args: Any = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())

    def new_order(self, txn: _Txn) -> None:
        rng = self.rng
        customer, warehouse = self.pools["customers"].pick(rng), self.pools["warehouses"].pick(rng)
        if customer is None or warehouse is None:
            return self.new_customer(txn)
        total = g._money(rng, 100_000)
        _, order_id = self._exec(
            "INSERT INTO sales_orders (order_no, customer_id, warehouse_id, status, ordered_at, promised_date, total, "
            "currency, note, updated_at) VALUES (%s, %s, %s, 'draft', NOW(6), CURDATE() + INTERVAL 7 DAY, %s, %s, %s, NOW())",
            (f"SO-W{rng.getrandbits(40):010X}", customer, warehouse, str(total), rng.pick(g.CURRENCIES),
             rng.pick([None, "加急 🔥", "churn ✅"])))
        txn.insert("sales_orders", order_id)
        for line_no in range(1, rng.between(1, 3) + 1):
            product = self.pools["products"].pick(rng) or 1
            quantity, price = g._money(rng, 100), g._money(rng, 1000)
            self._exec("INSERT INTO order_lines (order_id, line_no, product_id, quantity, unit_price, discount_pct, "
                       "line_total) VALUES (%s, %s, %s, %s, %s, 0.00, %s)",
                       (order_id, line_no, product, str(quantity), str(price), str((quantity * price).quantize(Decimal("0.0001")))))
            txn.insert("order_lines", (order_id, line_no))
            _, movement = self._exec(
                "INSERT INTO stock_movements (product_id, warehouse_id, kind, quantity, moved_at, recorded_at, clock_offset, "
                "tracking_hash) VALUES (%s, %s, 'issue', %s, NOW(6), NOW(6), %s, %s)",
                (product, warehouse, str(-quantity), mysql_time(timedelta(microseconds=rng.below(10**8) - 5 * 10**7)),
                 rng.getrandbits(64)))
            txn.insert("stock_movements", movement)
        return None

    def new_customer(self, txn: _Txn) -> None:
        rng = self.rng
        _, customer = self._exec(
            "INSERT INTO customers (code, name, email, country, segment, tags, credit_limit, is_active, flags, created_at, "
            "updated_at) VALUES (%s, %s, NULL, %s, 'retail', 'new', %s, 1, %s, NOW(6), NOW())",
            (f"W{rng.getrandbits(40):010X}", g._company(rng, rng.below(1000)), rng.pick(g.COUNTRIES),
             str(g._money(rng, 10_000)), rng.getrandbits(10)))
        txn.insert("customers", customer)

    def advance_order(self, txn: _Txn) -> None:
        rng = self.rng
        order = self.pools["sales_orders"].pick(rng)
        found = self._fetch("SELECT status, total FROM sales_orders WHERE id = %s FOR UPDATE", (order,)) if order else []
        if not found:
            return self.new_order(txn)
        status, total = found[0]
        statuses = ENUM_VALUES[("sales_orders", "status")]
        following = statuses[min(statuses.index(status) + 1, 3)] if status != "cancelled" else "draft"
        txn.update("sales_orders", self._exec("UPDATE sales_orders SET status = %s, note = %s, updated_at = NOW() WHERE id = %s",
                              (following, f"{following} {rng.pick(g.EMOJI)} {rng.getrandbits(16)}", order))[0])
        txn.update("order_lines", self._exec("UPDATE order_lines SET quantity = quantity + 1, discount_pct = %s WHERE order_id = %s "
                              "AND line_no = 1", (rng.pick(["0.00", "5.00", "12.50"]), order))[0])
        if following == "invoiced" and status != "invoiced":
            amount = Decimal(total)
            _, invoice = self._exec(
                "INSERT INTO invoices (order_id, invoice_no, fiscal_year, issued_on, due_on, amount, tax, paid, pdf, payload) "
                "VALUES (%s, %s, YEAR(CURDATE()), CURDATE(), CURDATE() + INTERVAL 30 DAY, %s, %s, 0, %s, %s)",
                (order, f"INV-W{rng.getrandbits(40):010X}", str(amount), str((amount * Decimal("0.13")).quantize(Decimal("0.0001"))),
                 b"%PDF-1.4\n" + rng.randbytes(rng.below(64)), orjson.dumps({"remark": "电子发票 🧾", "lines": 1}).decode()))
            txn.insert("invoices", invoice)
        return None

    def edit_master_data(self, txn: _Txn) -> None:
        rng = self.rng
        customer = self.pools["customers"].pick(rng)
        tags = ENUM_VALUES[("customers", "tags")]
        if customer is not None:
            txn.update("customers", self._exec(
                "UPDATE customers SET name = %s, tags = %s, attributes = %s, credit_limit = %s, flags = %s, "
                "is_active = %s, updated_at = NOW() WHERE id = %s",
                (g._company(rng, rng.below(1000)) + " " + rng.pick(g.EMOJI), ",".join(g._subset(rng, tags)),
                 orjson.dumps({"tier": rng.between(1, 5), "edited": "✏️ 修改"}).decode(),
                 str(g._money(rng, 10_000_000) * rng.pick([1, -1])), rng.getrandbits(10), rng.random() < 0.9, customer))[0])
        product = self.pools["products"].pick(rng)
        if product is not None:
            txn.update("products", self._exec(
                "UPDATE products SET unit_price = %s, external_id = %s, specs = JSON_SET(COALESCE(specs, '{}'), '$.rev', %s) "
                "WHERE id = %s", (str(g._money(rng, 100_000)), 2**63 + rng.getrandbits(63), rng.getrandbits(20), product))[0])

    def cancel_order(self, txn: _Txn) -> None:
        rng = self.rng
        order = self.pools["sales_orders"].pick(rng)
        if order is None:
            return self.new_order(txn)
        lines = [r[0] for r in self._fetch("SELECT line_no FROM order_lines WHERE order_id = %s FOR UPDATE", (order,))]
        invoices = [r[0] for r in self._fetch("SELECT id FROM invoices WHERE order_id = %s FOR UPDATE", (order,))]
        txn.delete("order_lines", [(order, n) for n in lines],
                   self._exec("DELETE FROM order_lines WHERE order_id = %s", (order,))[0])
        txn.delete("invoices", invoices, self._exec("DELETE FROM invoices WHERE order_id = %s", (order,))[0])
        deleted = self._exec("DELETE FROM sales_orders WHERE id = %s", (order,))[0]
        txn.delete("sales_orders", [order] if deleted else [], deleted)
        return None

    def move_stock(self, txn: _Txn) -> None:
        rng = self.rng
        product, warehouse = self.pools["products"].pick(rng), self.pools["warehouses"].pick(rng)
        if product is not None and warehouse is not None:
            _, movement = self._exec(
                "INSERT INTO stock_movements (product_id, warehouse_id, kind, quantity, moved_at, recorded_at, transit_time, "
                "clock_offset, tracking_hash, reason_codes) VALUES (%s, %s, 'transfer', %s, NOW(6), NOW(6), %s, %s, %s, '')",
                (product, warehouse, str(g._money(rng, 500)), mysql_time(timedelta(hours=rng.between(1, 300))),
                 mysql_time(-timedelta(microseconds=rng.below(10**9))), 2**64 - 1 - rng.getrandbits(62)))
            txn.insert("stock_movements", movement)
        target = self.pools["stock_movements"].pick(rng)
        if target is not None:
            txn.update("stock_movements", self._exec(
                "UPDATE stock_movements SET kind = 'adjustment', quantity = %s, reason_codes = %s, clock_offset = %s "
                "WHERE id = %s", (str(-g._money(rng, 50)), "recount,damaged", mysql_time(timedelta(hours=-30, microseconds=-7)),
                                  target))[0])
        victim = self.pools["stock_movements"].pick(rng)
        if victim is not None and victim != target:
            deleted = self._exec("DELETE FROM stock_movements WHERE id = %s", (victim,))[0]
            txn.delete("stock_movements", [victim] if deleted else [], deleted)

    def touch_legacy(self, txn: _Txn) -> None:
        rng = self.rng
        sku = f"SKU-{self.pools['products'].pick(rng) or 1:06d}"
        txn.insert("legacy_price_list", None, self._exec(
            "INSERT INTO legacy_price_list (sku, price, currency, valid_from, valid_to, changed_by, remark) "
            "VALUES (%s, %s, %s, CURDATE(), NULL, 'churn', %s)",
            (sku, str(g._money(rng, 1000)), rng.pick(g.CURRENCIES), "价格调整 📈"))[0])
        other = f"SKU-{self.pools['products'].pick(rng) or 1:06d}"
        txn.update("legacy_price_list", self._exec("UPDATE legacy_price_list SET price = price + 1, remark = %s WHERE sku = %s LIMIT 1",
                              (f"bumped {rng.getrandbits(16)}", other))[0])
        victim = f"SKU-{self.pools['products'].pick(rng) or 1:06d}"
        txn.delete("legacy_price_list", [],
                   self._exec("DELETE FROM legacy_price_list WHERE sku = %s AND changed_by IS NOT NULL LIMIT 1", (victim,))[0])


# ---- CRM ----------------------------------------------------------------------------------------

BIG_BODY_MIN = 2_000
"""Bodies longer than this (in bytes) are candidates for TOAST; the workload's large ones are ~9.8 kB."""


class CrmWorkload(_Workload):
    database = "crm"

    def __init__(self, conn: psycopg.Connection[Any], seed: int, report: ChurnReport | None = None,
                 attempt: int = 0) -> None:
        super().__init__(conn, seed, report, attempt)
        for table in ("accounts", "contacts", "opportunities", "activities"):
            self.pools[table] = _Pool([r[0] for r in conn.execute(f"SELECT id FROM {table}")])
        self.big = _Pool([r[0] for r in conn.execute(
            "SELECT id FROM activities WHERE octet_length(body) > %s", (BIG_BODY_MIN,))])
        conn.commit()
        self.serial = 0
        self.mix = [(self.new_account, 10), (self.log_activity, 16), (self.touch_activity, 22),
                    (self.rewrite_activity, 8), (self.advance_opportunity, 14), (self.new_opportunity, 8),
                    (self.drop_contact, 6), (self.drop_opportunity, 6), (self.drop_activity, 10)]
        self._big_added: list[int] = []
        self._big_removed: list[int] = []

    def retryable(self, exc: Exception) -> bool:
        return isinstance(exc, pg_errors.DeadlockDetected | pg_errors.SerializationFailure | pg_errors.LockNotAvailable)

    def _exec(self, query: str, args: Any = None) -> psycopg.Cursor[Any]:
        return self.conn.execute(query, args)  # type: ignore[arg-type]

    def _body(self) -> str:
        self.serial += 1
        return g.big_body(self.rng, self.serial)

    def _insert_activity(self, txn: _Txn, account: Any, contact: Any = None, opportunity: Any = None,
                         big: bool = False) -> None:
        rng = self.rng
        body = self._body() if big else rng.pick(["Left a voicemail.", "客户要求报价 📄", None])
        row = self._exec(
            "INSERT INTO activities (account_id, contact_id, opportunity_id, kind, subject, body, duration, done, attachment, "
            "occurred_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, false, %s, now(), now()) RETURNING id",
            (account, contact, opportunity, rng.pick(g.ACTIVITY_KINDS), f"churn {rng.pick(['回访', 'demo', '🔔'])}", body,
             timedelta(seconds=rng.below(7200)), rng.randbytes(rng.below(32)) if rng.random() < 0.2 else None)).fetchone()
        assert row is not None
        txn.insert("activities", row[0])
        if big:
            self._big_added.append(row[0])

    def new_account(self, txn: _Txn) -> None:
        rng = self.rng
        account = uuid.uuid4()
        now = datetime.now(UTC)
        self._exec(
            "INSERT INTO accounts (id, name, domain, industry, annual_revenue, employees, tags, is_customer, profile, logo, "
            "created_at, updated_at) VALUES (%s, %s, NULL, %s, %s, %s, %s, false, %s, NULL, %s, %s)",
            (account, g._company(rng, rng.below(1000)), rng.pick(g.INDUSTRIES), g._money(rng, 10**6, 2),
             rng.between(1, 500), ["new", rng.pick(g.TRICKY_TAGS)], orjson.dumps({"source": "churn ✨"}).decode(), now, now))
        txn.insert("accounts", account)
        contact = None
        for _ in range(rng.between(1, 2)):
            first, last = g._person(rng, rng.below(99))
            row = self._exec(
                "INSERT INTO contacts (account_id, first_name, last_name, email, opted_in, tags, last_seen, created_at) "
                "VALUES (%s, %s, %s, NULL, %s, %s, localtimestamp, now()) RETURNING id",
                (account, first, last, rng.random() < 0.5, ["churn"])).fetchone()
            assert row is not None
            contact = row[0]
            txn.insert("contacts", contact)
        self._insert_activity(txn, account, contact)

    def log_activity(self, txn: _Txn) -> None:
        account = self.pools["accounts"].pick(self.rng)
        if account is None:
            return self.new_account(txn)
        self._insert_activity(txn, account, self.pools["contacts"].pick(self.rng), big=self.rng.random() < 0.5)
        return None

    def touch_activity(self, txn: _Txn) -> None:
        """Update rows with a large body without touching it: WAL carries no body for these."""
        rng = self.rng
        activity = self.big.pick(rng)
        if activity is None:
            return self.log_activity(txn)
        rowcount = self._exec("UPDATE activities SET done = NOT done, duration = %s, updated_at = now() WHERE id = %s",
                              (timedelta(minutes=rng.between(1, 240), microseconds=rng.below(10**6)), activity)).rowcount
        txn.update("activities", rowcount)
        txn.counts["toast_unchanged"] += rowcount
        account = self.pools["accounts"].pick(rng)
        txn.update("accounts", self._exec("UPDATE accounts SET updated_at = now(), tags = %s WHERE id = %s",
                              ([rng.pick(g.TRICKY_TAGS), "touched"], account)).rowcount)
        return None

    def rewrite_activity(self, txn: _Txn) -> None:
        rng = self.rng
        activity = self.big.pick(rng)
        if activity is None:
            return self.log_activity(txn)
        rowcount = self._exec("UPDATE activities SET body = %s, subject = %s, updated_at = now() WHERE id = %s",
                              (self._body(), f"rewritten {rng.getrandbits(16)}", activity)).rowcount
        txn.update("activities", rowcount)
        txn.counts["toast_changed"] += rowcount
        return None

    def advance_opportunity(self, txn: _Txn) -> None:
        rng = self.rng
        opportunity = self.pools["opportunities"].pick(rng)
        if opportunity is None:
            return self.new_opportunity(txn)
        stage = rng.pick(ENUM_VALUES[("opportunities", "stage")])
        txn.update("opportunities", self._exec(
            "UPDATE opportunities SET stage = %s, amount = %s, probability = %s, sales_cycle = sales_cycle + %s, "
            "details = COALESCE(details, '{}') || %s::jsonb, closed_at = CASE WHEN %s THEN now() END WHERE id = %s",
            (stage, Decimal(rng.getrandbits(70)).scaleb(-rng.between(0, 9)), Decimal(rng.below(10_001)).scaleb(-4),
             -timedelta(hours=rng.below(48), microseconds=rng.below(10**6)),
             orjson.dumps({"stage_note": f"{stage} 📈"}).decode(), stage in ("won", "lost"), opportunity)).rowcount)
        account = self.pools["accounts"].pick(rng)
        if account is not None:
            self._insert_activity(txn, account, opportunity=opportunity)
        return None

    def new_opportunity(self, txn: _Txn) -> None:
        rng = self.rng
        account = self.pools["accounts"].pick(rng)
        if account is None:
            return self.new_account(txn)
        row = self._exec(
            "INSERT INTO opportunities (account_id, contact_id, title, stage, amount, probability, expected_close, sales_cycle, "
            "details, created_at) VALUES (%s, %s, %s, 'prospect', %s, 0.1000, current_date + 30, %s, %s, now()) RETURNING id",
            (account, self.pools["contacts"].pick(rng), f"churn deal {rng.pick(g.EMOJI)}", g._money(rng, 10**6, 3),
             timedelta(days=rng.below(90)), orjson.dumps({"competitors": ["用友"]}).decode())).fetchone()
        assert row is not None
        txn.insert("opportunities", row[0])
        return None

    def _delete_activities(self, txn: _Txn, where: str, value: Any) -> None:
        cur = self._exec(f"DELETE FROM activities WHERE {where} = %s RETURNING id", (value,))
        ids = [r[0] for r in cur.fetchall()]
        txn.delete("activities", ids)
        self._big_removed.extend(ids)

    def drop_contact(self, txn: _Txn) -> None:
        contact = self.pools["contacts"].pick(self.rng)
        if contact is None:
            return
        self._delete_activities(txn, "contact_id", contact)
        txn.update("opportunities", self._exec("UPDATE opportunities SET contact_id = NULL WHERE contact_id = %s", (contact,)).rowcount)
        deleted = self._exec("DELETE FROM contacts WHERE id = %s", (contact,)).rowcount
        txn.delete("contacts", [contact] if deleted else [], deleted)
        return

    def drop_opportunity(self, txn: _Txn) -> None:
        opportunity = self.pools["opportunities"].pick(self.rng)
        if opportunity is None:
            return
        self._delete_activities(txn, "opportunity_id", opportunity)
        deleted = self._exec("DELETE FROM opportunities WHERE id = %s", (opportunity,)).rowcount
        txn.delete("opportunities", [opportunity] if deleted else [], deleted)
        return

    def drop_activity(self, txn: _Txn) -> None:
        pool = self.big if self.rng.random() < 0.3 and len(self.big) else self.pools["activities"]
        activity = pool.pick(self.rng)
        if activity is not None:
            self._delete_activities(txn, "id", activity)

    def step(self) -> int:
        self._big_added, self._big_removed = [], []
        return super().step()

    def after_commit(self, txn: _Txn) -> None:
        for key in self._big_added:
            self.big.add(key)
        for key in self._big_removed:
            self.big.remove(key)


# ---- driver -------------------------------------------------------------------------------------

_MARIADB_CONNECTION_LOST = {1053, 1927, 2003, 2006, 2013}  # shutdown, killed, can't connect, gone, lost


def connection_lost(exc: BaseException) -> bool:
    """The session is gone (server restarted, backend killed, network cut): reconnecting may help."""
    if isinstance(exc, pymysql.err.InterfaceError | psycopg.OperationalError | InfraError):
        return True
    return isinstance(exc, pymysql.err.OperationalError) and exc.args[0] in _MARIADB_CONNECTION_LOST


def run_workload(workload: _Workload, rate: float, duration: float | None, stop: threading.Event) -> ChurnReport:
    """Run transactions until ``duration`` seconds pass or ``stop`` is set, pacing rows changed to ``rate``/s."""
    started = time.monotonic()
    deadline = None if duration is None else started + duration
    changed = 0
    while not stop.is_set():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        due = started + changed / rate
        if due > now:
            stop.wait(due - now if deadline is None else min(due - now, deadline - now))
            continue
        changed += max(workload.step(), 1)  # a transaction that changed nothing still takes its turn
    workload.report.seconds = time.monotonic() - started
    return workload.report


def _run_database(name: str, ep: Endpoint, rate: float, duration: float | None, seed: int,
                  stop: threading.Event, reconnect_for: float) -> ChurnReport:
    """One database's workload, reopening the session (and re-reading the key pools) after it is lost.
    ``reconnects`` counts the outages survived; a server that refuses the first connection fails at once."""
    started = time.monotonic()
    deadline = None if duration is None else started + duration
    report = ChurnReport(name)
    attempt, connected, lost_at = 0, False, None
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        remaining = None if deadline is None else deadline - time.monotonic()
        try:
            if name == "erp":
                with erp_connect(ep) as conn:
                    connected, lost_at = True, None
                    run_workload(ErpWorkload(conn, seed, report, attempt), rate, remaining, stop)
            else:
                with crm_connect(ep, application_name=CHURN_APPLICATION) as conn:
                    connected, lost_at = True, None
                    run_workload(CrmWorkload(conn, seed, report, attempt), rate, remaining, stop)
            break
        except Exception as exc:
            if not connection_lost(exc) or not connected:
                raise
            now = time.monotonic()
            if reconnect_for <= 0 or (lost_at is not None and now - lost_at >= reconnect_for):
                raise InfraError(f"`{name}` must stay reachable while the workload runs (retried for {reconnect_for:g} s);"
                                 f" got {type(exc).__name__}: {exc}") from exc
            if lost_at is None:
                lost_at = now
                report.counts["reconnects"] += 1
            attempt += 1
            stop.wait(0.5)
    report.seconds = time.monotonic() - started
    return report


def churn(target: str = "all", rate: float = 50.0, duration: float | None = 10.0, seed: int = DEFAULT_SEED, *,
          erp: Endpoint | None = None, crm: Endpoint | None = None,
          stop: threading.Event | None = None, reconnect_for: float = 30.0) -> dict[str, ChurnReport]:
    """Run the workload on ``target`` (erp, crm or all; one thread per database) at about ``rate`` changed
    rows per second on each database, for ``duration`` seconds or until ``stop`` is set (duration None).

    A lost session (a restarted or killed server) is reopened for up to ``reconnect_for`` seconds
    (0: fail at once) with an `InfraError`. Returns one `ChurnReport` per database; errors other than
    deadlocks and lost sessions propagate."""
    if target not in ("erp", "crm", "all"):
        raise ValueError(f"`target` must be erp, crm or all; got {target!r}")
    if not rate > 0:
        raise ValueError(f"`rate` must be > 0; got {rate!r}")
    if duration is None and stop is None:
        raise ValueError("`duration` must be set when no `stop` event is given; got None")
    stop = stop or threading.Event()
    names = ["erp", "crm"] if target == "all" else [target]
    reports: dict[str, ChurnReport] = {}
    failures: list[BaseException] = []

    def work(name: str) -> None:
        ep = (erp or endpoint("erp")) if name == "erp" else (crm or endpoint("crm"))
        try:
            reports[name] = _run_database(name, ep, rate, duration, seed, stop, reconnect_for)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            failures.append(exc)
            stop.set()

    threads = [threading.Thread(target=work, args=(name,), name=f"churn-{name}", daemon=True) for name in names]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
    return reports
