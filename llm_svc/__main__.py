"""Run the LLM worker: ``python -m llm_svc``."""

import sys

from llm_svc.service import LlmWorker
from shared.service import run

if __name__ == "__main__":
    sys.exit(run("llm", LlmWorker, lambda s: s.llm.metrics_port))
