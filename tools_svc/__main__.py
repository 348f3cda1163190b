"""Run the tools worker: ``python -m tools_svc``."""

import sys

from shared.service import run
from tools_svc.service import ToolsWorker

if __name__ == "__main__":
    sys.exit(run("tools", ToolsWorker, lambda s: s.tools.metrics_port))
