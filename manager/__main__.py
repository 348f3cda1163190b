"""Run the manager: ``python -m manager``."""

import sys

from manager.service import ManagerService
from shared.service import run

if __name__ == "__main__":
    sys.exit(run("manager", ManagerService, lambda s: s.manager.metrics_port))
