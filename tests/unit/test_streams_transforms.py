"""Per-table transforms: validated against the real columns, applied exactly, filters as data."""

from __future__ import annotations

import hashlib
from datetime import date, datetime
from decimal import Decimal

import pytest
from branchline.errors import BadRecordError, ConfigError
from branchline.events import UNCHANGED, ChangeEvent, Column, ColumnType, Json, Op, TableId, TableSchema
from branchline.streams.config import TableTransforms
from branchline.streams.transforms import compile_transforms, validate_tables
from pydantic import ValidationError

TABLE = TableId(source="erp", branch="b07", database="erp", table="customers")
SCHEMA = TableSchema(
    id=TABLE,
    columns=(
        Column(name="id", type=ColumnType.INT64, nullable=False),
        Column(name="name", type=ColumnType.STRING),
        Column(name="email", type=ColumnType.STRING),
        Column(name="iban", type=ColumnType.STRING),
        Column(name="phone", type=ColumnType.STRING),
        Column(name="credit", type=ColumnType.DECIMAL, precision=12, scale=2),
        Column(name="country", type=ColumnType.STRING),
        Column(name="since", type=ColumnType.DATE),
        Column(name="code", type=ColumnType.STRING),
        Column(name="meta", type=ColumnType.STRING),
    ),
    primary_key=("id",),
)


def row(**overrides):
    base = {"id": 1, "name": "Ada", "email": "ada@example.org", "iban": "DE89370400440532013000",
            "phone": "+49 30 1234567", "credit": Decimal("1500.00"), "country": "DE", "since": date(2020, 5, 1),
            "code": "0042", "meta": '{"tier": "gold"}'}
    base.update(overrides)
    return base


def change(op=Op.CREATE, before=None, after=None, position=100):
    image = after if after is not None else before
    return ChangeEvent(op=op, table=TABLE, key={"id": image["id"]} if image else {}, before=before,
                       after=after, position=position)


def compiled(**spec):
    return compile_transforms(SCHEMA, TableTransforms.model_validate(spec))


def test_include_exclude_and_rename():
    t = compiled(exclude=["phone", "meta"], rename="clients", rename_columns={"name": "full_name"})
    out = t.apply(change(after=row()))
    assert out.table.table == "clients" and out.table.database == "erp"
    assert "phone" not in out.after and "meta" not in out.after
    assert out.after["full_name"] == "Ada" and "name" not in out.after
    assert [c.name for c in t.schema.columns][:2] == ["id", "full_name"]
    assert t.schema.id.table == "clients"
    only = compiled(include=["name"])
    assert only.apply(change(after=row())).after == {"id": 1, "name": "Ada"}  # the key always stays


def test_masks_hash_redact_keep_last():
    t = compiled(mask={"email": {"method": "sha256", "salt": "pepper"}, "phone": {"method": "redact"},
                       "iban": {"method": "keep_last", "keep": 4}})
    out = t.apply(change(after=row())).after
    assert out["email"] == hashlib.sha256(b"pepper" + b"ada@example.org").hexdigest()
    assert out["phone"] is None
    assert out["iban"] == "*" * 18 + "3000"
    assert t.schema.column("email").type is ColumnType.STRING and t.schema.column("phone").nullable


def test_hash_mask_digests_stay_exact_through_its_cache(monkeypatch):
    from branchline.streams import transforms

    monkeypatch.setattr(transforms, "_DIGESTS_MAX", 3)  # overflows: the cache is cleared and refilled
    t = compiled(mask={"email": {"method": "sha256", "salt": "pepper"}})
    emails = [f"user{i % 5}@example.org" for i in range(20)]
    for email in emails:
        out = t.apply(change(after=row(email=email))).after
        assert out["email"] == hashlib.sha256(b"pepper" + email.encode()).hexdigest()
    other = compiled(mask={"email": {"method": "sha256", "salt": "salt2"}})  # caches are per mask, never shared
    assert other.apply(change(after=row())).after["email"] == hashlib.sha256(b"salt2ada@example.org").hexdigest()


def test_hashed_primary_key_is_hashed_in_the_key_too():
    t = compiled(mask={"id": {"method": "sha256", "salt": "s"}})
    out = t.apply(change(after=row()))
    expected = hashlib.sha256(b"s1").hexdigest()
    assert out.key == {"id": expected} and out.after["id"] == expected


def test_filters_are_data_and_a_row_leaving_the_filter_is_deleted():
    t = compiled(filters=[{"column": "country", "op": "in", "value": ["DE", "AT"]},
                          {"column": "credit", "op": ">=", "value": "1000"}])
    assert t.apply(change(after=row())) is not None
    assert t.apply(change(after=row(country="FR"))) is None
    assert t.apply(change(after=row(credit=Decimal("999.99")))) is None
    assert t.apply(change(after=row(credit=None))) is None  # NULL never compares true
    left = t.apply(change(Op.UPDATE, before=row(), after=row(country="FR")))
    assert left.op is Op.DELETE and left.key == {"id": 1} and left.after is None
    deleted = t.apply(change(Op.DELETE, before=row(country="FR")))
    assert deleted.op is Op.DELETE


def test_filter_operators_and_dates():
    cases = [("==", "DE", True), ("!=", "DE", False), ("<", "E", True), ("<=", "DE", True), (">", "DE", False),
             (">=", "DF", False)]
    for op, value, expected in cases:
        t = compiled(filters=[{"column": "country", "op": op, "value": value}])
        assert (t.apply(change(after=row())) is not None) is expected, op
    t = compiled(filters=[{"column": "since", "op": ">=", "value": date(2020, 1, 1)}])
    assert t.apply(change(after=row())) is not None
    assert compiled(filters=[{"column": "email", "op": "is_null"}]).apply(change(after=row())) is None
    assert compiled(filters=[{"column": "email", "op": "not_null"}]).apply(change(after=row())) is not None
    assert compiled(filters=[{"column": "country", "op": "not_in", "value": ["DE"]}]).apply(change(after=row())) is None


def test_filter_value_fitting_and_operator_shape_are_checked():
    with pytest.raises(ConfigError, match="credit"):
        compiled(filters=[{"column": "credit", "op": ">", "value": "lots"}])
    with pytest.raises(ValidationError):
        TableTransforms.model_validate({"filters": [{"column": "a", "op": "in", "value": 1}]})
    with pytest.raises(ValidationError):
        TableTransforms.model_validate({"filters": [{"column": "a", "op": "~=", "value": 1}]})
    # a YAML float literal becomes the Decimal of its text, never a binary float
    decimal = TableTransforms.model_validate({"filters": [{"column": "a", "op": "==", "value": 0.1}]})
    assert decimal.filters[0].value == Decimal("0.1")


def test_constants_fill_branch_and_source():
    t = compiled(constants={"branch_id": "{branch}", "origin": "{source}:{database}.{table}", "tenant": 3})
    out = t.apply(change(after=row())).after
    assert out["branch_id"] == "b07" and out["origin"] == "erp:erp.customers" and out["tenant"] == 3
    assert t.schema.column("tenant").type is ColumnType.INT64
    assert t.schema.column("branch_id").type is ColumnType.STRING


def test_casts():
    t = compiled(casts={"code": "int64", "credit": "string", "meta": "json", "since": "timestamp"})
    out = t.apply(change(after=row())).after
    assert out["code"] == 42 and out["credit"] == "1500.00" and out["meta"] == Json({"tier": "gold"})
    assert out["since"] == datetime(2020, 5, 1)
    assert {c.name: c.type for c in t.schema.columns}["code"] is ColumnType.INT64
    with pytest.raises(BadRecordError) as info:
        t.apply(change(after=row(code="12.5"), position=777))
    assert "erp.customers" in str(info.value) and "777" in str(info.value) and "{'id': 1}" in str(info.value)


def test_unchanged_toast_values_pass_masks_and_casts_untouched():
    t = compiled(mask={"email": {"method": "sha256", "salt": "s"}}, casts={"meta": "json"},
                 filters=[{"column": "meta", "op": "not_null"}])
    out = t.apply(change(Op.UPDATE, after=row(email=UNCHANGED, meta=UNCHANGED)))
    assert out.after["email"] is UNCHANGED and out.after["meta"] is UNCHANGED


@pytest.mark.parametrize("spec", [
    {"exclude": ["phone", "meta"], "mask": {"email": {"method": "sha256", "salt": "s"}},
     "constants": {"branch_id": "{branch}", "tenant": 3}},
    {"rename": "clients", "rename_columns": {"name": "full_name", "id": "customer_id"},
     "mask": {"iban": {"method": "keep_last", "keep": 4}, "phone": {"method": "redact"}}},
    {"include": ["name", "code", "credit"], "casts": {"code": "int64", "credit": "string"},
     "constants": {"origin": "{source}:{table}"}},
    {"mask": {"id": {"method": "sha256", "salt": "k"}}, "rename_columns": {"email": "mail"}},
])
def test_in_place_transform_equals_the_copying_one(spec):
    """`apply_owned` (the worker's path: the decoder's event changed in place, by generated code)
    gives exactly what `apply` gives, for every kind of change and for TOAST placeholders."""
    t = compiled(**spec)
    changes = [
        lambda: change(after=row()),
        lambda: change(Op.UPDATE, before=row(name="Old"), after=row(email=UNCHANGED, meta=UNCHANGED)),
        lambda: change(Op.DELETE, before=row(phone=None)),
        lambda: change(Op.READ, after=row(email=None, iban="12")),
    ]
    for make in changes:
        expected = t.apply(make())
        got = t.apply_owned(make())
        assert got.model_dump() == expected.model_dump()
        assert got.table == t.schema.id


def test_truncate_is_renamed_and_passes():
    t = compiled(rename="clients", filters=[{"column": "country", "op": "==", "value": "DE"}])
    out = t.apply(ChangeEvent(op=Op.TRUNCATE, table=TABLE, key={}, position=5))
    assert out.op is Op.TRUNCATE and out.table.table == "clients"


def test_unknown_table_and_columns_are_one_config_error_naming_both():
    tables = {
        "erp.customers": TableTransforms.model_validate(
            {"exclude": ["fax"], "mask": {"ssn": {"method": "redact"}}, "rename_columns": {"nmae": "n"},
             "filters": [{"column": "region", "op": "==", "value": "x"}]}),
        "erp.custmers": TableTransforms(),
    }
    with pytest.raises(ConfigError) as info:
        validate_tables(tables, {"erp.customers": SCHEMA}, source="pipeline.yaml")
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 5
    for column in ("fax", "ssn", "nmae", "region"):
        assert f"got {column!r}" in text
    assert "table `erp.customers`" in text
    assert "`tables.erp.custmers` must name a captured table" in text
    assert text.startswith("pipeline.yaml: ")


def test_primary_key_cannot_be_dropped_or_masked_lossily():
    with pytest.raises(ConfigError, match="primary-key column `id`"):
        compiled(exclude=["id"])
    with pytest.raises(ConfigError, match="must be sha256"):
        compiled(mask={"id": {"method": "keep_last", "keep": 2}})


def test_name_collisions_are_config_errors():
    with pytest.raises(ConfigError, match="distinct column names"):
        compiled(rename_columns={"name": "email"})
    with pytest.raises(ConfigError, match="collide"):
        compiled(constants={"country": "x"})
    with pytest.raises(ConfigError, match="placeholders"):
        compiled(constants={"x": "{hostname}"})
    with pytest.raises(ConfigError, match="convert from"):
        compiled(casts={"since": "int64"})


def test_no_transforms_is_the_identity():
    t = compile_transforms(SCHEMA, None)
    event = change(after=row())
    assert t.apply(event) is event and t.schema is SCHEMA


def test_transforms_model_forbids_unknown_fields():
    with pytest.raises(ValidationError):
        TableTransforms.model_validate({"exclud": ["x"]})
    with pytest.raises(ValidationError):
        TableTransforms.model_validate({"include": ["a"], "exclude": ["b"]})
