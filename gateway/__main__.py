"""Run the gateway: ``python -m gateway``."""

import sys

from gateway.server import Gateway
from shared.service import run

if __name__ == "__main__":
    sys.exit(run("gateway", Gateway, lambda s: s.gateway.metrics_port))
