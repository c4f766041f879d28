"""The runtime in apps: every input an app has, the fast path, streaming, threads and hostile images."""
from __future__ import annotations

import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from distiller.cli import main
from runtime import Classifier, Preprocess, UserError, load_image, preprocess


def _photo(w, h, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 / w), (y * 255 / h), ((x // 7 + y // 5) % 64) * 4], -1) + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 48-bit RGB, nor lie about its size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def clf(smoke_run):
    return Classifier.load(smoke_run / "student.onnx")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("inputs") / "photo.jpg"
    _photo(320, 240).save(p, quality=92)
    return p


def test_bytes_pil_and_bgr_inputs_match_the_path(clf, photo):
    by_path = clf.classify(photo, top_k=2)
    assert clf.classify(photo.read_bytes(), top_k=2) == by_path
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    assert clf.classify(rgb, top_k=2) == by_path
    assert clf.classify(rgb[:, :, ::-1].copy(), top_k=2, channels="bgr") == by_path
    assert clf.classify(Image.open(photo), top_k=2) == by_path
    np.testing.assert_allclose(clf.prepare(rgb.astype(np.float32) / 255), clf.prepare(rgb), atol=1e-6)


def test_sixteen_bit_images_are_scaled_not_clipped(clf, tmp_path):
    gray8 = np.asarray(_photo(96, 80).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257
    p16 = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(p16)
    assert Image.open(p16).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(load_image(p16))[:, :, 0], gray8)   # read as white before
    p8 = tmp_path / "gray8.png"
    Image.fromarray(gray8).save(p8)
    assert clf.classify(p16, top_k=1)[0][0] == clf.classify(p8, top_k=1)[0][0]
    rgb8 = np.asarray(_photo(96, 80))
    rgb16 = rgb8.astype(">u2") * 257
    rows = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(rgb16.shape[0]))
    p48 = tmp_path / "rgb48.png"
    p48.write_bytes(_png(96, 80, 16, 2, rows))
    np.testing.assert_array_equal(np.asarray(load_image(p48)), rgb8)
    assert clf.classify(p48, top_k=1)[0][0] == clf.classify(rgb8, top_k=1)[0][0]
    np.testing.assert_array_equal(np.asarray(load_image(rgb16.astype(np.uint16))), rgb8)


def test_hostile_and_empty_inputs_raise_user_error(clf, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(50000, 50000, 8, 2, b"\x00" * 16))
    with pytest.raises(UserError, match="bomb.png: .*(megapixel|too large)"):
        clf.classify(bomb)
    wide = tmp_path / "wide.png"
    wide.write_bytes(_png(20000, 4000, 8, 2, b"\x00" * 16))   # 80 MP: under Pillow's bomb limit, over ours
    with pytest.raises(UserError, match="80 megapixels, over the 64 megapixel limit"):
        clf.classify(wide)
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5), np.uint8), Image.new("RGB", (0, 0)), b""):
        with pytest.raises(UserError, match="empty"):
            clf.classify(empty)
    with pytest.raises(UserError, match=r"float images must hold values in \[0, 1\]"):
        clf.classify(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(UserError, match="cannot classify a dict"):
        clf.classify({"not": "an image"})
    assert clf.classify([]) == []


def test_predict_skips_a_bomb_and_classifies_the_rest(smoke_run, photo, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(50000, 50000, 8, 2, b"\x00" * 16))
    assert main(["predict", str(smoke_run), str(photo), str(bomb), str(photo), "--json"]) == 0
    cap = capsys.readouterr()
    assert len(cap.out.splitlines()) == 2 and "bomb.png" in cap.err and "1 of 3 images skipped" in cap.err
    assert "Traceback" not in cap.err


def test_large_jpegs_decode_in_draft_mode(tmp_path):
    big = tmp_path / "big.jpg"
    _photo(2400, 1600).save(big, quality=90)
    cfg = Preprocess.from_crop_pct(128, 0.875)
    assert load_image(big).size == (2400, 1600)                                  # exact: full size
    assert load_image(big, draft_short=2 * cfg.resize).size == (600, 400)          # 1/4: 400 >= 2 x 146
    exact, fast = preprocess(big, cfg), preprocess(big, cfg, fast=True)
    assert exact.shape == fast.shape == (3, 128, 128)
    assert np.abs(exact - fast).mean() < 0.05 and np.corrcoef(exact.ravel(), fast.ravel())[0, 1] > 0.98
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    assert load_image(png, draft_short=292).size == (2400, 1600)                  # draft is for JPEGs only


def test_fast_path_agrees_with_the_exact_path(smoke_run, tmp_path):
    paths = []
    for i in range(24):
        p = tmp_path / f"frame{i}.jpg"
        _photo(1280, 720, seed=i).rotate(7 * i, expand=False).save(p, quality=90)
        paths.append(p)
    exact = Classifier.load(smoke_run / "student.onnx", exact=True)
    fast = Classifier.load(smoke_run / "student.onnx")
    a = [r[0][0] for r in exact.classify(paths, top_k=1)]
    b = [r[0][0] for r in fast.classify(paths, top_k=1)]
    assert np.mean([x == y for x, y in zip(a, b)]) >= 0.9
    pa, pb = exact.probabilities(paths), fast.probabilities(paths)
    assert np.abs(pa - pb).max() < 0.1


def test_classify_iter_keeps_order_and_bounds_what_is_in_flight(clf, photo):
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    images = [rgb if i % 3 else rgb[::-1].copy() for i in range(50)]
    expected = [clf.classify(im, top_k=2) for im in images]
    pulled, yielded, worst = [0], [0], [0]

    def source():
        for im in images:
            pulled[0] += 1
            worst[0] = max(worst[0], pulled[0] - yielded[0])
            yield im
    got = []
    for r in clf.classify_iter(source(), top_k=2, batch_size=8, workers=2):
        got.append(r)
        yielded[0] += 1
    assert got == expected
    assert worst[0] <= 8 + 2, worst[0]
    errs = list(clf.classify_iter([rgb, b"broken", rgb], errors="return"))
    assert isinstance(errs[1], UserError) and errs[0] == errs[2] == clf.classify(rgb)
    with pytest.raises(UserError):
        list(clf.classify_iter([rgb, b"broken"]))


def test_eight_threads_sharing_one_classifier_match_one(smoke_run, photo):
    for model in ("student.onnx", "openvino/student.xml"):
        shared = Classifier.load(smoke_run / model)
        frames = [np.asarray(_photo(200 + 7 * i, 150 + 3 * i, seed=i)) for i in range(16)]
        one = [shared.classify(f, top_k=2) for f in frames]
        out: dict[int, list] = {}

        def work(t):
            out[t] = [shared.classify(f, top_k=2) for f in frames]
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(out[t] == one for t in range(8)), model


def test_bench_e2e_reports_images_per_second(smoke_run, photo, tmp_path, capsys):
    import json
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(photo.read_bytes())
    (folder / "junk.jpg").write_bytes(b"junk")
    assert main(["bench", str(smoke_run / "student.onnx"), "--runs", "3", "--warmup", "1", "--batch", "4",
                 "--e2e", str(folder), "--json"]) == 0
    e = json.loads(capsys.readouterr().out)["e2e"]
    assert e["images"] == 7 and e["skipped"] == 1 and e["e2e_ips"] > 0 and e["model_ips"] > 0
    assert e["ms_per_image"] == pytest.approx(1e3 / e["e2e_ips"])
    assert main(["bench", str(smoke_run / "student.onnx"), "--e2e", str(tmp_path / "none")]) == 2
    assert "not a folder of images" in capsys.readouterr().err
