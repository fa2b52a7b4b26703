"""Odd image files: oversized (decompression bombs), 16-bit greyscale, corrupt bytes inside the
image data. Each is one bad file (named, skipped or refused) or read the same way in training and
prediction."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers.cli_runs import FAST, read_metrics, run_cli, single_run_dir
from helpers.medgemma_toy import classifier as medgemma_classifier
from helpers.medgemma_toy import tiny_path
from PIL import Image

from breakhis_ft.data.breakhis import scan_breakhis
from breakhis_ft.data.dataset import build_image_cache
from breakhis_ft.data.png import load_image, png_problem
from breakhis_ft.data.synthetic import build_replica
from breakhis_ft.deploy.predict import ImageFiles, Predictor, find_images, predict_to_csv
from breakhis_ft.errors import BadDataError

BOMB_SIDE = 20_000  # 400 megapixels: above PIL's own limit and data.max_image_pixels


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid 1-bit black PNG of side x side pixels, written in about 0.2 s (tens of kB)."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )
    return path


def write_16bit(path: Path, high: int = 4095, shape: tuple[int, int] = (40, 60)) -> np.ndarray:
    """A 16-bit greyscale PNG holding a gradient 0..high (a 12-bit camera's range by default)."""
    values = np.linspace(0, high, shape[0] * shape[1]).reshape(shape).round().astype(np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    return values


@pytest.fixture
def tree(tmp_path: Path, replica_scan) -> tuple[Path, list]:
    """A private BreakHis tree of 12 replica images (the files may be damaged here)."""
    records = replica_scan.records[::40][:12]
    for r in records:
        (tmp_path / "data" / r.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(replica_scan.root / r.path, tmp_path / "data" / r.path)
    return tmp_path / "data", records


def test_an_oversized_png_is_one_bad_file(tree) -> None:
    root, records = tree
    bomb = write_bomb(root / records[2].path)  # a BreakHis name, 400 megapixels
    assert "image too large" in png_problem(bomb)
    with pytest.raises(BadDataError, match=f"{bomb.name}: image too large"):
        load_image(bomb)  # PIL's DecompressionBombError, named as a bad file
    with pytest.raises(
        BadDataError, match=rf"(?s)1 bad file.*{bomb.name}: image too large \(20000x20000"
    ):
        scan_breakhis(root)  # on_bad_file=error: refused at the scan, before any model
    scan = scan_breakhis(root, on_bad_file="skip")
    assert [Path(p).name for p, _ in scan.bad_files] == [bomb.name]
    assert len(scan.records) == len(records) - 1
    # the limit is a setting: a 48x32 image is too large for a limit of 1535 pixels
    assert "data.max_image_pixels=1,535" in png_problem(root / records[0].path, max_pixels=1535)
    assert png_problem(root / records[0].path, max_pixels=1536) is None
    with pytest.raises(ValueError, match="data.max_image_pixels=0"):
        scan_breakhis(root, max_pixels=0)


def test_prediction_names_the_oversized_file_and_predicts_the_others(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = medgemma_classifier(tiny_path(tmp_path_factory))
    predictor = Predictor(model, 32, "tiny")
    Image.new("RGB", (70, 46), (200, 120, 170)).save(tmp_path / "a.png")
    write_bomb(tmp_path / "b.png")
    Image.new("RGB", (46, 70), (120, 80, 170)).save(tmp_path / "c.png")
    out = tmp_path / "pred.csv"
    paths = find_images([tmp_path])
    assert predict_to_csv(predictor, paths, out, cpu=True, progress=False) == (2, 1)
    rows = {Path(r.split(",")[0]).name: r for r in out.read_text().splitlines()[1:]}
    assert "image too large (20000x20000" in rows["b.png"]
    assert all(rows[n].split(",")[1] in predictor.class_names for n in ("a.png", "c.png"))
    assert model.input_side == 112  # the tiny Gemma 3's processor square (caps the resize)


def test_16bit_images_are_scaled_by_their_range_alike_in_training_and_prediction(
    tmp_path: Path, replica_scan
) -> None:
    record = replica_scan.records[0]
    path = tmp_path / "data" / record.path
    path.parent.mkdir(parents=True)
    values = write_16bit(path)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (*values.shape, 3) and pixels.dtype == np.uint8
    expected = np.round(values.astype(float) * 255 / 4095).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected)  # 0 -> 0, 4095 -> 255, linear between
    assert (pixels == 255).mean() < 0.01 and pixels.mean() == pytest.approx(127.5, abs=1)
    # training's cache and prediction's loader give the same pixels
    cache = build_image_cache([record], tmp_path / "data", 32, tmp_path / "cache", progress=False)
    predicted = ImageFiles([path], 32)[0]["image"]
    assert predicted.size == (32, 21)
    assert np.array_equal(np.asarray(cache.image(record.path)), np.asarray(predicted))


def test_a_corrupt_byte_inside_the_image_data_is_found_at_the_scan(tree) -> None:
    root, records = tree
    path = root / records[4].path
    data = bytearray(path.read_bytes())
    data[data.index(b"IDAT") + 12] ^= 0xFF  # one byte of compressed pixels; the file ends on IEND
    path.write_bytes(bytes(data))
    with pytest.raises(BadDataError, match=f"{path.name}: corrupt or truncated PNG"):
        scan_breakhis(root)  # the default (on_bad_file=error) checks every chunk's CRC
    skipped = scan_breakhis(root, on_bad_file="skip")
    assert [Path(p).name for p, _ in skipped.bad_files] == [path.name]


def test_images_are_cached_no_larger_than_the_model_reads() -> None:
    from breakhis_ft.data.dataset import cached_longest_side

    # BreakHis's 700x460 for MedGemma (896), MedSigLIP (448) and the tiny models (112, 64)
    assert cached_longest_side(700, 460, 896, 896) == 896
    assert cached_longest_side(700, 460, 896, 448) == 682  # shorter side 448: nothing lost
    assert cached_longest_side(700, 460, 896, 112) == 170
    assert cached_longest_side(460, 700, 896, 64) == 97
    assert cached_longest_side(700, 460, 128, 112) == 128  # data.image_size is the upper bound
    assert cached_longest_side(700, 460, 896, None) == 896


def test_a_run_refuses_or_skips_bad_files_before_the_model_loads(tmp_path: Path) -> None:
    """data=breakhis on a tree with a corrupt PNG and an oversized one: `error` stops at the scan
    (no model built), `skip` lists both and trains, caching at the tiny model's 112 px."""
    root = build_replica(tmp_path / "tree", 0.03, (48, 32), 0)
    records = scan_breakhis(root).records
    corrupt, bomb = root / records[10].path, root / records[20].path
    data = bytearray(corrupt.read_bytes())
    data[data.index(b"IDAT") + 12] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    write_bomb(bomb)
    args = ["data=breakhis", f"data.root={root}", "model=tiny_gemma3", "logger=none"]
    args += [arg for arg in FAST if arg != "data.image_size=32"]  # data=breakhis's 896
    refused = run_cli([*args, f"paths.output_dir={tmp_path / 'refused'}"], tmp_path / "cache")
    assert refused.returncode != 0
    assert "2 bad file(s)" in refused.stderr and "data.on_bad_file=skip" in refused.stderr
    assert (
        f"{corrupt.name}: corrupt" in refused.stderr
        and f"{bomb.name}: image too large" in refused.stderr
    )
    assert not (tmp_path / "cache" / "models").exists()  # stopped before any model was built
    out = tmp_path / "skipped"
    done = run_cli([*args, "data.on_bad_file=skip", f"paths.output_dir={out}"], tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = single_run_dir(out)
    listed = (run_dir / "bad_files.csv").read_text()
    assert corrupt.name in listed and bomb.name in listed and listed.startswith("# 2 bad file(s)")
    assert read_metrics(run_dir)["test"]["accuracy"] >= 0
    log = done.stdout + done.stderr
    assert "MB (longest side <= 896 px, shorter side >= the model's 112 px)" in log
    (arrow,) = (tmp_path / "cache" / "data" / "images").rglob("data.arrow")
    heights = datasets.Dataset.from_file(str(arrow))["height"]
    assert set(heights) == {112}  # 48x32 images at the model's 112 px, not at 896x597
