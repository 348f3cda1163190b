"""Ids are never reused; the console's Talk device id is random and stored.

SQLite hands out max(id)+1, so a deleted user's id (and everything keyed on it) came back for
the next user; AUTOINCREMENT makes SQLite remember the highest id ever used. The tables are
rebuilt for that (SQLite cannot alter it in place); MySQL/MariaDB (InnoDB, persistent
AUTO_INCREMENT since MySQL 8 / MariaDB 10.2.4) and PostgreSQL (sequences) never reuse ids
and only get the new column.

``users.talk_device_id``: the Talk page's device, ``web-`` + 128 random bits (was
``web-<user id>``, which anyone could predict and bind first through OTA).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = ["users", "api_tokens", "agents", "devices", "chat_turns", "firmware", "login_failures"]


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # manager.db.migrate runs SQLite migrations with foreign keys off, so rebuilding a parent
        # table (DROP + RENAME) cascades nothing into its children.
        for table in TABLES:
            with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}) as batch:
                if table == "users":
                    batch.add_column(sa.Column("talk_device_id", sa.String(64), nullable=True))
                    batch.create_unique_constraint("uq_users_talk_device_id", ["talk_device_id"])
    else:
        op.add_column("users", sa.Column("talk_device_id", sa.String(64), nullable=True))
        op.create_unique_constraint("uq_users_talk_device_id", "users", ["talk_device_id"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("users", recreate="always") as batch:
            batch.drop_constraint("uq_users_talk_device_id", type_="unique")
            batch.drop_column("talk_device_id")
    else:
        op.drop_constraint("uq_users_talk_device_id", "users", type_="unique")
        op.drop_column("users", "talk_device_id")
