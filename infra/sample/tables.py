"""The sample tables as Branchline sees them: columns, types and primary keys of each table.

Declared once here (beside erp.sql / crm.sql, which create them) so that the generator, the
read-back normaliser and other parts' tests agree on each column's canonical Python value;
tests/integration/test_sample.py checks these declarations against information_schema.
"""

from __future__ import annotations

from branchline.events import Column, ColumnType, TableId, TableSchema

T = ColumnType

ENUM_VALUES: dict[tuple[str, str], tuple[str, ...]] = {
    ("customers", "segment"): ("retail", "wholesale", "distributor", "internal"),
    ("customers", "tags"): ("vip", "export", "tax_exempt", "blocked", "new"),
    ("products", "category"): ("raw", "component", "finished", "service"),
    ("sales_orders", "status"): ("draft", "confirmed", "shipped", "invoiced", "cancelled"),
    ("stock_movements", "kind"): ("receipt", "issue", "transfer", "adjustment"),
    ("stock_movements", "reason_codes"): ("damaged", "expired", "recount", "return", "theft"),
    ("opportunities", "stage"): ("prospect", "qualified", "proposal", "negotiation", "won", "lost"),
}
"""Allowed values of each ENUM / SET / PostgreSQL enum column, in declaration order."""


def _c(name: str, type_: ColumnType, source: str, nullable: bool = False, precision: int | None = None,
       scale: int | None = None, length: int | None = None) -> Column:
    return Column(name=name, type=type_, nullable=nullable, precision=precision, scale=scale,
                  length=length, source_type=source)


def _dec(name: str, precision: int, scale: int, nullable: bool = False) -> Column:
    return _c(name, T.DECIMAL, f"decimal({precision},{scale})", nullable, precision, scale)


ERP_COLUMNS: dict[str, tuple[Column, ...]] = {
    "customers": (
        _c("id", T.INT64, "int unsigned"),
        _c("code", T.STRING, "varchar(20)", length=20),
        _c("name", T.STRING, "varchar(200)", length=200),
        _c("email", T.STRING, "varchar(200)", True, length=200),
        _c("country", T.STRING, "char(2)", length=2),
        _c("segment", T.ENUM, "enum"),
        _c("tags", T.SET, "set"),
        _dec("credit_limit", 18, 4),
        _c("is_active", T.BOOLEAN, "tinyint(1)"),
        _c("flags", T.BITS, "bit(10)", length=10),
        _c("birth_date", T.DATE, "date", True),
        _c("attributes", T.JSON, "json", True),
        _c("created_at", T.TIMESTAMP, "datetime(6)", precision=6),
        _c("updated_at", T.TIMESTAMPTZ, "timestamp", precision=0),
    ),
    "products": (
        _c("id", T.INT64, "int unsigned"),
        _c("sku", T.STRING, "varchar(32)", length=32),
        _c("name", T.STRING, "varchar(200)", length=200),
        _c("category", T.ENUM, "enum"),
        _dec("unit_price", 18, 4),
        _c("external_id", T.UINT64, "bigint unsigned"),
        _c("is_active", T.BOOLEAN, "tinyint(1)"),
        _c("image", T.BYTES, "blob", True),
        _c("specs", T.JSON, "json", True),
        _c("created_at", T.TIMESTAMP, "datetime(6)", precision=6),
    ),
    "warehouses": (
        _c("id", T.INT32, "smallint unsigned"),
        _c("code", T.STRING, "char(6)", length=6),
        _c("name", T.STRING, "varchar(100)", length=100),
        _c("city", T.STRING, "varchar(100)", length=100),
        _c("opened", T.YEAR, "year"),
        _c("is_active", T.BOOLEAN, "tinyint(1)"),
        _c("opens_at", T.TIME, "time", precision=0),
        _c("closes_at", T.TIME, "time", precision=0),
    ),
    "sales_orders": (
        _c("id", T.UINT64, "bigint unsigned"),
        _c("order_no", T.STRING, "varchar(20)", length=20),
        _c("customer_id", T.INT64, "int unsigned"),
        _c("warehouse_id", T.INT32, "smallint unsigned"),
        _c("status", T.ENUM, "enum"),
        _c("ordered_at", T.TIMESTAMP, "datetime(6)", precision=6),
        _c("promised_date", T.DATE, "date", True),
        _dec("total", 18, 4),
        _c("currency", T.STRING, "char(3)", length=3),
        _c("note", T.STRING, "varchar(500)", True, length=500),
        _c("updated_at", T.TIMESTAMPTZ, "timestamp", precision=0),
    ),
    "order_lines": (
        _c("order_id", T.UINT64, "bigint unsigned"),
        _c("line_no", T.INT32, "smallint unsigned"),
        _c("product_id", T.INT64, "int unsigned"),
        _dec("quantity", 18, 4),
        _dec("unit_price", 18, 4),
        _dec("discount_pct", 5, 2),
        _dec("line_total", 18, 4),
    ),
    "invoices": (
        _c("id", T.UINT64, "bigint unsigned"),
        _c("order_id", T.UINT64, "bigint unsigned"),
        _c("invoice_no", T.STRING, "varchar(24)", length=24),
        _c("fiscal_year", T.YEAR, "year"),
        _c("issued_on", T.DATE, "date"),
        _c("due_on", T.DATE, "date"),
        _dec("amount", 18, 4),
        _dec("tax", 18, 4),
        _c("paid", T.BOOLEAN, "tinyint(1)"),
        _c("pdf", T.BYTES, "blob", True),
        _c("payload", T.JSON, "json", True),
    ),
    "stock_movements": (
        _c("id", T.UINT64, "bigint unsigned"),
        _c("product_id", T.INT64, "int unsigned"),
        _c("warehouse_id", T.INT32, "smallint unsigned"),
        _c("kind", T.ENUM, "enum"),
        _dec("quantity", 18, 4),
        _c("moved_at", T.TIMESTAMP, "datetime(6)", precision=6),
        _c("recorded_at", T.TIMESTAMPTZ, "timestamp(6)", precision=6),
        _c("transit_time", T.TIME, "time", True, precision=0),
        _c("clock_offset", T.TIME, "time(6)", precision=6),
        _c("tracking_hash", T.UINT64, "bigint unsigned"),
        _c("reason_codes", T.SET, "set"),
    ),
    "legacy_price_list": (
        _c("sku", T.STRING, "varchar(32)", length=32),
        _dec("price", 18, 4),
        _c("currency", T.STRING, "char(3)", length=3),
        _c("valid_from", T.DATE, "date"),
        _c("valid_to", T.DATE, "date", True),
        _c("changed_by", T.STRING, "varchar(30)", True, length=30),
        _c("remark", T.STRING, "text", True),
    ),
}

CRM_COLUMNS: dict[str, tuple[Column, ...]] = {
    "accounts": (
        _c("id", T.UUID, "uuid"),
        _c("name", T.STRING, "text"),
        _c("domain", T.STRING, "text", True),
        _c("industry", T.STRING, "text"),
        _dec("annual_revenue", 20, 2, True),
        _c("employees", T.INT32, "integer", True),
        _c("tags", T.STRING_ARRAY, "text[]"),
        _c("is_customer", T.BOOLEAN, "boolean"),
        _c("profile", T.JSON, "jsonb", True),
        _c("logo", T.BYTES, "bytea", True),
        _c("created_at", T.TIMESTAMPTZ, "timestamptz", precision=6),
        _c("updated_at", T.TIMESTAMPTZ, "timestamptz", precision=6),
    ),
    "contacts": (
        _c("id", T.INT64, "bigint"),
        _c("account_id", T.UUID, "uuid"),
        _c("first_name", T.STRING, "text"),
        _c("last_name", T.STRING, "text"),
        _c("email", T.STRING, "text", True),
        _c("phone", T.STRING, "text", True),
        _c("birthday", T.DATE, "date", True),
        _c("opted_in", T.BOOLEAN, "boolean", True),
        _c("tags", T.STRING_ARRAY, "text[]", True),
        _c("preferences", T.JSON, "jsonb", True),
        _c("last_seen", T.TIMESTAMP, "timestamp(6)", True, precision=6),
        _c("created_at", T.TIMESTAMPTZ, "timestamptz", precision=6),
    ),
    "opportunities": (
        _c("id", T.INT64, "bigint"),
        _c("account_id", T.UUID, "uuid"),
        _c("contact_id", T.INT64, "bigint", True),
        _c("title", T.STRING, "text"),
        _c("stage", T.ENUM, "deal_stage"),
        _c("amount", T.DECIMAL, "numeric", True),
        _dec("probability", 5, 4),
        _c("expected_close", T.DATE, "date", True),
        _c("sales_cycle", T.INTERVAL, "interval", True),
        _c("details", T.JSON, "jsonb", True),
        _c("created_at", T.TIMESTAMPTZ, "timestamptz", precision=6),
        _c("closed_at", T.TIMESTAMPTZ, "timestamptz", True, precision=6),
    ),
    "activities": (
        _c("id", T.INT64, "bigint"),
        _c("account_id", T.UUID, "uuid"),
        _c("contact_id", T.INT64, "bigint", True),
        _c("opportunity_id", T.INT64, "bigint", True),
        _c("kind", T.STRING, "text"),
        _c("subject", T.STRING, "text"),
        _c("body", T.STRING, "text", True),
        _c("duration", T.INTERVAL, "interval", True),
        _c("done", T.BOOLEAN, "boolean"),
        _c("attachment", T.BYTES, "bytea", True),
        _c("occurred_at", T.TIMESTAMPTZ, "timestamptz", precision=6),
        _c("updated_at", T.TIMESTAMPTZ, "timestamptz", precision=6),
    ),
}

PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "customers": ("id",),
    "products": ("id",),
    "warehouses": ("id",),
    "sales_orders": ("id",),
    "order_lines": ("order_id", "line_no"),
    "invoices": ("id",),
    "stock_movements": ("id",),
    "legacy_price_list": (),
    "accounts": ("id",),
    "contacts": ("id",),
    "opportunities": ("id",),
    "activities": ("id",),
}
"""Primary key of every sample table; empty for the legacy table that has none."""

ERP_TABLES: tuple[str, ...] = tuple(ERP_COLUMNS)
"""ERP tables in load order."""
CRM_TABLES: tuple[str, ...] = tuple(CRM_COLUMNS)
"""CRM tables in load order."""
TABLES: dict[str, tuple[str, ...]] = {"erp": ERP_TABLES, "crm": CRM_TABLES}
"""Tables of each sample database (the database names are `erp` and `crm`)."""

TOAST_COLUMN = ("activities", "body")
"""The CRM column whose large values PostgreSQL stores out of line."""


def database_of(table: str) -> str:
    """`erp` or `crm`: table names are unique across the two sample databases."""
    for database, tables in TABLES.items():
        if table in tables:
            return database
    raise KeyError(f"`table` must be one of {sorted(PRIMARY_KEYS)}; got {table!r}")


def columns(table: str) -> tuple[Column, ...]:
    """The declared columns of one sample table, in table order."""
    return ERP_COLUMNS[table] if database_of(table) == "erp" else CRM_COLUMNS[table]


def table_schema(table: str, source: str | None = None, branch: str = "local") -> TableSchema:
    """A `TableSchema` for one sample table, as a source named ``source`` would report it."""
    database = database_of(table)
    schema = None if database == "erp" else "public"
    table_id = TableId(source=source or database, branch=branch, database=database, schema_=schema, table=table)
    return TableSchema(id=table_id, columns=columns(table), primary_key=PRIMARY_KEYS[table])
