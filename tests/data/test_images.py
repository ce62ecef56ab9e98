"""Image reading (issue 24 items 3 and 4): the header is checked before decoding, truncation is refused."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageFile

from php_runner.data.images import ImageFileError, image_problems, read_image


def jpeg(path, size=(32, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_truncated_jpeg_is_refused_and_truncation_is_never_allowed_globally(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg(path)[:300])
    with pytest.raises(ImageFileError, match=str(path)):
        read_image(str(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_oversized_image_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    jpeg(path, size=(100, 100))
    monkeypatch.setenv("PHP_RUN_MAX_IMAGE_PIXELS", "9999")
    with pytest.raises(ImageFileError, match="100x100 image has 10000 pixels, over the limit of 9999"):
        read_image(str(path))
    monkeypatch.setenv("PHP_RUN_MAX_IMAGE_PIXELS", "10000")
    assert read_image(str(path)).size == (100, 100)


def test_image_problems_lists_each_bad_image_once_and_calls_back_per_image(tmp_path):
    good, cut, junk = tmp_path / "good.jpg", tmp_path / "cut.jpg", tmp_path / "junk.jpg"
    jpeg(good)
    cut.write_bytes(jpeg(cut)[:300])
    junk.write_bytes(b"\x00" * 40)
    calls = []
    found = image_problems([str(good), str(cut), str(junk)], workers=2, on_done=lambda: calls.append(1))
    assert [path for path, _ in found] == [str(cut), str(junk)] and len(calls) == 3
