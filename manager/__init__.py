"""The manager: users, devices, agents and live configuration, over a REST API (FastAPI).

It keeps its own database (SQLite by default; MySQL/MariaDB and PostgreSQL supported) and
publishes what the voice pipeline needs (each device's agent) to NATS KV, which the services
read on every turn: a change applies to the next turn, without a restart.
"""
