"""An agent's speech synthesis engine: ``agents.tts_engine`` (a name from the TTS stage's
tts.engines, e.g. "piper", "zh"). NULL: the engine of the reply's language, else tts.engine.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("agents", sa.Column("tts_engine", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("tts_engine")
