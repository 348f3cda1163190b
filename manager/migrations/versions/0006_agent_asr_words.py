"""An agent's words for speech recognition: ``agents.asr_hotwords`` (a JSON list of names the
engine should expect, for engines that take hotwords) and ``agents.asr_corrections`` (a JSON
object heard -> meant, applied to every engine's transcript). NULL: none.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns: SQLite adds them in place (no table rebuild), as 0005 does.
    op.add_column("agents", sa.Column("asr_hotwords", sa.JSON(), nullable=True))
    op.add_column("agents", sa.Column("asr_corrections", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("asr_corrections")
        batch.drop_column("asr_hotwords")
