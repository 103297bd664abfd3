"""Sample ERP (MariaDB) and CRM (PostgreSQL) databases: schemas, deterministic rows, bulk load, live churn.

The public API others reuse from tests and the demo::

    from branchline.infra.sample import rows, load, churn, read_table, erp_connect, crm_connect
"""

from __future__ import annotations

from .connect import Endpoint, crm_connect, endpoint, erp_connect
from .generate import DEFAULT_SEED, count, rows
from .loader import TableLoad, load, read_table
from .tables import CRM_TABLES, ERP_TABLES, PRIMARY_KEYS, TABLES, columns, database_of, table_schema
from .workload import ChurnReport, churn

__all__ = [
    "CRM_TABLES",
    "DEFAULT_SEED",
    "ERP_TABLES",
    "PRIMARY_KEYS",
    "TABLES",
    "ChurnReport",
    "Endpoint",
    "TableLoad",
    "churn",
    "columns",
    "count",
    "crm_connect",
    "database_of",
    "endpoint",
    "erp_connect",
    "load",
    "read_table",
    "rows",
    "table_schema",
]
