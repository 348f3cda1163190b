"""Run the ASR worker: ``python -m asr_svc``."""

import sys

from asr_svc.service import AsrWorker
from shared.service import run

if __name__ == "__main__":
    sys.exit(run("asr", AsrWorker, lambda s: s.asr.metrics_port))
