"""The seed document's tables, exactly as it creates them, and our own additions.

``db init`` runs this DDL unchanged on MariaDB (only ``IF NOT EXISTS`` added,
so it may be run twice), and an equivalent on SQLite, where ``COLLATE NOCASE``
mirrors the case-insensitive matching of the seed's utf8mb4 collation.  Note the ``id``
columns have no AUTO_INCREMENT: the admin code picks the next id itself.

``MARIADB_DDL``/``SQLITE_DDL`` are the seed's two tables only.  Our additions
(``ban``) are separate tables, created with ``IF NOT EXISTS`` by the same
``db init`` after the seed's (``Admin.init_schema``): running it again on a
database made from the seed is the migration.  It adds tables and never
alters or touches ``domain`` and ``alias``.
"""

MARIADB_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS `domain` (
`id` int(11) NOT NULL,
`name` varchar(255) NOT NULL,
`active` tinyint(1) DEFAULT 1,
PRIMARY KEY (`id`),
UNIQUE KEY `name` (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE IF NOT EXISTS `alias` (
`id` int(11) NOT NULL,
`address` varchar(255) NOT NULL,
`goto` varchar(255) NOT NULL,
`active` tinyint(1) DEFAULT 1,
`domain_id` int(11) NOT NULL,
`created` timestamp NULL DEFAULT current_timestamp(),
`modified` timestamp NULL DEFAULT current_timestamp()
ON UPDATE current_timestamp(),
PRIMARY KEY (`id`),
UNIQUE KEY `uq_alias_address` (`address`),
KEY `address` (`address`),
KEY `domain_id` (`domain_id`),
CONSTRAINT `alias_ibfk_1`
FOREIGN KEY (`domain_id`) REFERENCES `domain` (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
)

SQLITE_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS domain (
id INTEGER NOT NULL PRIMARY KEY,
name VARCHAR(255) NOT NULL COLLATE NOCASE UNIQUE,
active TINYINT(1) DEFAULT 1
)""",
    """CREATE TABLE IF NOT EXISTS alias (
id INTEGER NOT NULL PRIMARY KEY,
address VARCHAR(255) NOT NULL COLLATE NOCASE UNIQUE,
goto VARCHAR(255) NOT NULL,
active TINYINT(1) DEFAULT 1,
domain_id INTEGER NOT NULL REFERENCES domain (id),
created TIMESTAMP NULL DEFAULT CURRENT_TIMESTAMP,
modified TIMESTAMP NULL DEFAULT CURRENT_TIMESTAMP
)""",
    "CREATE INDEX IF NOT EXISTS alias_domain_id ON alias (domain_id)",
)

# Bans (``tables/bans.py``): client IPs/CIDRs, senders and aliases refused with 554 5.7.1.
# Times are Unix seconds (UTC); ``expires`` NULL means never.
MARIADB_BAN_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS `ban` (
`id` int(11) NOT NULL AUTO_INCREMENT,
`kind` varchar(16) NOT NULL,
`value` varchar(255) NOT NULL,
`reason` varchar(255) NOT NULL DEFAULT '',
`created` bigint NOT NULL,
`expires` bigint NULL DEFAULT NULL,
PRIMARY KEY (`id`),
UNIQUE KEY `uq_ban_kind_value` (`kind`, `value`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
)

SQLITE_BAN_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS ban (
id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
kind VARCHAR(16) NOT NULL,
value VARCHAR(255) NOT NULL COLLATE NOCASE,
reason VARCHAR(255) NOT NULL DEFAULT '',
created BIGINT NOT NULL,
expires BIGINT NULL DEFAULT NULL,
UNIQUE (kind, value)
)""",
)
