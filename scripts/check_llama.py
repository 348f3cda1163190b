"""Check that llama-cpp-python decodes with the packaged model (a bad native build segfaults)."""

import subprocess
import sys

CODE = """
from llm_svc.backends import packaged_gguf
from llama_cpp import Llama
llm = Llama(model_path=packaged_gguf(), n_ctx=256, n_threads=1, verbose=False)
out = llm.create_completion("Hello", max_tokens=2, temperature=0)
assert out["choices"][0]["text"] is not None
print("llama.cpp ok")
"""

result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
print(result.stdout.strip() or result.stderr.strip()[-500:])
sys.exit(0 if result.returncode == 0 else 1)
