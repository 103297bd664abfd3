-- The sample ERP: a branch's order-to-invoice system on MariaDB.
-- Column types are chosen to break naive pipelines: DECIMAL(18,4), BIGINT UNSIGNED above 2^63,
-- DATETIME(6), TIMESTAMP, DATE, TIME (negative and above 24 h), YEAR, ENUM, SET, JSON, TINYINT(1),
-- BIT, utf8mb4 text with Chinese and emoji, BLOB, a composite key and a table without a key.
-- No foreign-key constraints (like many legacy ERPs): the generator and the workload keep references
-- valid, and tests may delete rows freely. Re-running this file recreates every table.

DROP TABLE IF EXISTS legacy_price_list;
DROP TABLE IF EXISTS stock_movements;
DROP TABLE IF EXISTS invoices;
DROP TABLE IF EXISTS order_lines;
DROP TABLE IF EXISTS sales_orders;
DROP TABLE IF EXISTS warehouses;
DROP TABLE IF EXISTS products;
DROP TABLE IF EXISTS customers;

CREATE TABLE customers (
  id            INT UNSIGNED NOT NULL AUTO_INCREMENT,
  code          VARCHAR(20) NOT NULL,
  name          VARCHAR(200) NOT NULL,
  email         VARCHAR(200) NULL,
  country       CHAR(2) NOT NULL,
  segment       ENUM('retail','wholesale','distributor','internal') NOT NULL,
  tags          SET('vip','export','tax_exempt','blocked','new') NOT NULL DEFAULT '',
  credit_limit  DECIMAL(18,4) NOT NULL,
  is_active     TINYINT(1) NOT NULL,
  flags         BIT(10) NOT NULL,
  birth_date    DATE NULL,
  attributes    JSON NULL,
  created_at    DATETIME(6) NOT NULL,
  updated_at    TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  PRIMARY KEY (id),
  UNIQUE KEY uq_customers_code (code)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;

CREATE TABLE products (
  id            INT UNSIGNED NOT NULL AUTO_INCREMENT,
  sku           VARCHAR(32) NOT NULL,
  name          VARCHAR(200) NOT NULL,
  category      ENUM('raw','component','finished','service') NOT NULL,
  unit_price    DECIMAL(18,4) NOT NULL,
  external_id   BIGINT UNSIGNED NOT NULL,
  is_active     TINYINT(1) NOT NULL,
  image         BLOB NULL,
  specs         JSON NULL,
  created_at    DATETIME(6) NOT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uq_products_sku (sku)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;

CREATE TABLE warehouses (
  id            SMALLINT UNSIGNED NOT NULL AUTO_INCREMENT,
  code          CHAR(6) NOT NULL,
  name          VARCHAR(100) NOT NULL,
  city          VARCHAR(100) NOT NULL,
  opened        YEAR NOT NULL,
  is_active     TINYINT(1) NOT NULL,
  opens_at      TIME NOT NULL,
  closes_at     TIME NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;

CREATE TABLE sales_orders (
  id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  order_no      VARCHAR(20) NOT NULL,
  customer_id   INT UNSIGNED NOT NULL,
  warehouse_id  SMALLINT UNSIGNED NOT NULL,
  status        ENUM('draft','confirmed','shipped','invoiced','cancelled') NOT NULL,
  ordered_at    DATETIME(6) NOT NULL,
  promised_date DATE NULL,
  total         DECIMAL(18,4) NOT NULL,
  currency      CHAR(3) NOT NULL,
  note          VARCHAR(500) NULL,
  updated_at    TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  PRIMARY KEY (id),
  KEY ix_sales_orders_customer (customer_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;

CREATE TABLE order_lines (
  order_id      BIGINT UNSIGNED NOT NULL,
  line_no       SMALLINT UNSIGNED NOT NULL,
  product_id    INT UNSIGNED NOT NULL,
  quantity      DECIMAL(18,4) NOT NULL,
  unit_price    DECIMAL(18,4) NOT NULL,
  discount_pct  DECIMAL(5,2) NOT NULL,
  line_total    DECIMAL(18,4) NOT NULL,
  PRIMARY KEY (order_id, line_no),
  KEY ix_order_lines_product (product_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;

CREATE TABLE invoices (
  id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  order_id      BIGINT UNSIGNED NOT NULL,
  invoice_no    VARCHAR(24) NOT NULL,
  fiscal_year   YEAR NOT NULL,
  issued_on     DATE NOT NULL,
  due_on        DATE NOT NULL,
  amount        DECIMAL(18,4) NOT NULL,
  tax           DECIMAL(18,4) NOT NULL,
  paid          TINYINT(1) NOT NULL,
  pdf           BLOB NULL,
  payload       JSON NULL,
  PRIMARY KEY (id),
  KEY ix_invoices_order (order_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;

CREATE TABLE stock_movements (
  id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  product_id    INT UNSIGNED NOT NULL,
  warehouse_id  SMALLINT UNSIGNED NOT NULL,
  kind          ENUM('receipt','issue','transfer','adjustment') NOT NULL,
  quantity      DECIMAL(18,4) NOT NULL,
  moved_at      DATETIME(6) NOT NULL,
  recorded_at   TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  transit_time  TIME NULL,
  clock_offset  TIME(6) NOT NULL,
  tracking_hash BIGINT UNSIGNED NOT NULL,
  reason_codes  SET('damaged','expired','recount','return','theft') NOT NULL DEFAULT '',
  PRIMARY KEY (id),
  KEY ix_stock_movements_product (product_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;

-- Imported from the previous system and never given a key; holds exact duplicate rows.
CREATE TABLE legacy_price_list (
  sku           VARCHAR(32) NOT NULL,
  price         DECIMAL(18,4) NOT NULL,
  currency      CHAR(3) NOT NULL,
  valid_from    DATE NOT NULL,
  valid_to      DATE NULL,
  changed_by    VARCHAR(30) NULL,
  remark        TEXT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;
