"""The seed document's tables, exactly as it creates them.

``db init`` runs this DDL unchanged on MariaDB (only ``IF NOT EXISTS`` added,
so it may be run twice), and an equivalent on SQLite, where ``COLLATE NOCASE``
mirrors the case-insensitive matching of the seed's utf8mb4 collation.  Note the ``id``
columns have no AUTO_INCREMENT: the admin code picks the next id itself.
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
