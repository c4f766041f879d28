"""The torch-free runtime: preprocessing parity with timm / open_clip transforms, metadata, errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from runtime import Classifier, ModelMetadata, Preprocess, UserError, load_image, preprocess


def _photo(w, h, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) % 64) * 4], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    base = _photo(301, 173)
    paths = {}
    for mode in ("RGB", "L", "RGBA", "P", "CMYK"):
        img = base.convert(mode) if mode != "P" else base.convert("P", palette=Image.ADAPTIVE)
        p = d / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(p)
        paths[mode] = p
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = d / "exif.jpg"
    base.save(p, exif=exif.tobytes())
    paths["exif"] = p
    paths["tall"] = d / "tall.png"
    _photo(97, 411, 1).save(paths["tall"])
    return paths


def _reference_input(path):
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


@pytest.mark.parametrize("kind", ["RGB", "L", "RGBA", "P", "CMYK", "exif", "tall"])
def test_matches_timm_eval_transform(images, kind):
    from timm.data import create_transform
    cfg = Preprocess.from_crop_pct(128, 0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ref_tf = create_transform(input_size=(3, 128, 128), interpolation="bicubic", crop_pct=0.875,
                              mean=cfg.mean, std=cfg.std, is_training=False)
    ref = ref_tf(_reference_input(images[kind])).numpy()
    ours = preprocess(images[kind], cfg)
    assert ours.shape == ref.shape == (3, 128, 128)
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("kind", ["RGB", "P", "exif", "tall"])
def test_matches_open_clip_eval_transform(images, kind):
    import open_clip
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    ref_tf = open_clip.image_transform(224, is_train=False, mean=mean, std=std)
    ref = ref_tf(_reference_input(images[kind])).numpy()
    ours = preprocess(images[kind], Preprocess(size=224, resize=224, interpolation="bicubic", mean=mean, std=std))
    assert np.abs(ours - ref).max() < 1e-5


def test_exif_rotation_is_applied(images):
    assert load_image(images["exif"]).size == (173, 301)
    assert load_image(images["RGB"]).size == (301, 173)


def test_inputs_array_pil_path_agree(images):
    cfg = Preprocess(size=64, resize=72)
    arr = np.asarray(Image.open(images["RGB"]).convert("RGB"))
    a = preprocess(arr, cfg)
    b = preprocess(Image.fromarray(arr), cfg)
    c = preprocess(images["RGB"], cfg)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)


def test_unreadable_images_raise_user_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg: cannot read it as an image"):
        load_image(bad)
    with pytest.raises(UserError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="uint8, uint16 or float"):
        load_image(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(UserError, match="HxW or HxWxC"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def test_metadata_json_round_trip_and_versioning():
    m = ModelMetadata(labels=("a", "b"), preprocess=Preprocess(size=64, resize=73), student="x", precision="int8")
    assert ModelMetadata.from_json(m.to_json()) == m
    from runtime.metadata import SCHEMA_VERSION
    newer = m.to_json().replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 99')
    with pytest.raises(UserError, match="newer than this runtime"):
        ModelMetadata.from_json(newer)
    with pytest.raises(UserError, match="fewer than 2 labels"):
        ModelMetadata(labels=("a",), preprocess=Preprocess(size=64, resize=64))
    with pytest.raises(UserError, match="unknown interpolation"):
        Preprocess(size=64, resize=64, interpolation="lanczos9")


def test_classifier_refuses_files_it_cannot_use(tmp_path):
    with pytest.raises(UserError, match="no such model file"):
        Classifier.load(tmp_path / "none.onnx")
    (tmp_path / "m.tflite").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown model format"):
        Classifier.load(tmp_path / "m.tflite")
    with pytest.raises(UserError, match="no report.json"):
        Classifier.load(tmp_path)
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(UserError, match="onnxruntime cannot load it"):
        Classifier.load(tmp_path / "bad.onnx")


def test_onnx_without_metadata_is_refused(tmp_path):
    import torch
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(tmp_path / "plain.onnx"), dynamo=False)
    with pytest.raises(UserError, match="has no distiller metadata"):
        Classifier.load(tmp_path / "plain.onnx")


def test_classify_batch_and_threads(smoke_run):
    from concurrent.futures import ThreadPoolExecutor

    from distiller.bank import Bank
    imgs = list(Bank(smoke_run / "bank").load("val")[0][:8])
    for f in ("student.onnx", "openvino/student.xml"):
        clf = Classifier.load(smoke_run / f, threads=1)
        batch = clf.classify(imgs, top_k=1)
        singles = [clf.classify(im, top_k=1) for im in imgs]
        assert [b[0][0] for b in batch] == [s[0][0] for s in singles]
        assert all(abs(b[0][1] - s[0][1]) < 1e-4 for b, s in zip(batch, singles))
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(lambda im: clf.classify(im, top_k=2), imgs * 4))
        full = [clf.classify(im, top_k=2) for im in imgs * 4]
        assert [[lab for lab, _ in r] for r in threaded] == [[lab for lab, _ in r] for r in full]
        np.testing.assert_allclose([[p for _, p in r] for r in threaded], [[p for _, p in r] for r in full], atol=1e-5)
