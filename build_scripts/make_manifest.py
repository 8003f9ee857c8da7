"""Merge the per-job artifact folders of build-libs.yml into one release folder.

Usage: python build_scripts/make_manifest.py PARTS_DIR OUT_DIR

Each ``PARTS_DIR/*/`` holds the archive(s) and the manifest.json that ``nexabind build --out``
wrote on one runner; OUT_DIR gets every archive and one manifest.json listing them all.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nexabind._artifact import update_manifest  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit(__doc__)
    parts, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for manifest in sorted(parts.glob("*/manifest.json")):
        for entry in json.loads(manifest.read_text())["artifacts"]:
            shutil.copy2(manifest.parent / entry["url"], out / entry["url"])
            update_manifest(out, entry)
            count += 1
    if count == 0:
        sys.exit(f"make_manifest: no */manifest.json under {parts}")
    print(f"{out / 'manifest.json'}: {count} artifacts")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
