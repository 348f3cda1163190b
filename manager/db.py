"""The database: an engine for the configured URL, and Alembic migrations run at start."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("manager.db")
MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for SQLite, MySQL/MariaDB (PyMySQL) or PostgreSQL (psycopg 3)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            _private_file(Path(parsed.database))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 15})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    # Connections a server dropped (idle timeouts, restarts) are noticed and replaced.
    return create_engine(url, pool_pre_ping=True, pool_recycle=1800, pool_size=5, max_overflow=10)


def _private_file(path: Path) -> None:
    """The database (password hashes, token digests, chat history) readable by its owner only:
    made 0600 before SQLite opens it (its -wal/-shm files take the same mode), and an existing
    one made so too."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(str(path) + suffix)
        if candidate.exists():
            candidate.chmod(0o600)


def alembic_config(engine: Engine):  # noqa: ANN201 - alembic.config.Config
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    from alembic import command

    config = alembic_config(engine)
    if engine.dialect.name == "sqlite":
        # Rebuilding a table (batch migrations) drops the old one: with foreign keys on, that
        # would cascade into its children. The pragma only takes effect outside a transaction.
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
    else:
        command.upgrade(config, "head")
    log.info("database schema up to date", extra={"fields": {"backend": engine.url.get_backend_name()}})


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
