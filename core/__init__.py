"""Branchline: change-data-capture from legacy MariaDB/MySQL and PostgreSQL into a cloud store."""

__version__ = "0.1.0"
