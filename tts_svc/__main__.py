"""Run the TTS worker: ``python -m tts_svc``."""

import sys

from shared.service import run
from tts_svc.service import TtsWorker

if __name__ == "__main__":
    sys.exit(run("tts", TtsWorker, lambda s: s.tts.metrics_port))
