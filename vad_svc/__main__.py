"""Run the VAD worker: ``python -m vad_svc``."""

import sys

from shared.service import run
from vad_svc.service import VadWorker

if __name__ == "__main__":
    sys.exit(run("vad", VadWorker, lambda s: s.vad.metrics_port))
