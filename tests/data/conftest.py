"""Shared fixtures: a small synthetic copy of each format, and a writer of hand-made annotation files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from php_runner.data.synthetic import write_synthetic

SMALL_TRAIN_IDS = 4


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """All three formats, 4 train ids (4 images each), 2 val and 2 test ids (2 images), seed 0; read-only."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, "all", num_ids=SMALL_TRAIN_IDS, seed=0)
    return root


@pytest.fixture
def make_annotated(tmp_path):
    """Write ``entries`` as the annotation file of ``name`` under a fresh root; create their images.

    ``images=False`` leaves the image files out; ``annotation`` overrides the file name and
    ``text`` writes raw text instead of JSON.
    """

    def make(name: str, entries=None, *, annotation: str | None = None, images: bool = True,
             text: str | None = None) -> Path:
        folder = tmp_path / name
        (folder / "imgs").mkdir(parents=True, exist_ok=True)
        file_name = annotation or {"CUHK-PEDES": "reid_raw.json", "ICFG-PEDES": "ICFG-PEDES.json",
                                   "RSTPReid": "data_captions.json"}[name]
        (folder / file_name).write_text(text if text is not None else json.dumps(entries), encoding="utf-8")
        if images and entries:
            for entry in entries:
                rel = entry.get("img_path", entry.get("file_path")) if isinstance(entry, dict) else None
                if isinstance(rel, str):
                    path = folder / "imgs" / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (8, 16), (10, 20, 30)).save(path)
        return tmp_path

    return make
