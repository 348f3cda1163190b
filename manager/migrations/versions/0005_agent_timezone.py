"""An agent's time zone: ``agents.timezone_offset_minutes`` (minutes east of UTC) for its
devices' clocks, handed out by OTA; NULL: the gateway's ``gateway.timezone_offset_minutes``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: SQLite adds it in place (no table rebuild), as the others do.
    op.add_column("agents", sa.Column("timezone_offset_minutes", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("timezone_offset_minutes")
