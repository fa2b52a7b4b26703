"""Linear probe on cached embeddings: it learns; the cache is reused, and invalidated."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers.builders import build
from helpers.siglip_toy import (
    FP32,
    PROBE,
    CallCounter,
    examples,
    model_cfg,
    replica,
    split_by_patient,
    tiny_path,
)
from PIL import Image
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_accuracy

from breakhis_ft.data.records import class_names, label_of
from breakhis_ft.models.embedding_cache import MAX_SHARDS, EmbeddingCache

TASK = "eva4"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_path(tmp_path_factory)


@pytest.fixture(scope="module")
def scan(request, tmp_path_factory):
    return replica(request, tmp_path_factory)


def probe(tiny, cache_dir, **overrides):
    cfg = model_cfg(tiny, freeze_encoder=True, **overrides)
    return build(cfg, PROBE, FP32, class_names(TASK), cache_dir)


def test_linear_probe_learns_above_chance_on_held_out_patients(tiny, scan, tmp_path):
    records = [r for r in scan.records if label_of(r, TASK) is not None]
    train, test = split_by_patient(records)
    torch.manual_seed(0)
    classifier = probe(tiny, tmp_path / "emb")
    classifier.prepare_embeddings([r.path for r in records], scan.root)
    # The engine's interface: DataLoader with the classifier's collate over path-only examples.
    loader = DataLoader(
        examples(train, TASK),
        batch_size=32,
        shuffle=True,
        collate_fn=lambda ex: classifier.collate(ex, train=True),
    )
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=1e-2)
    classifier.train()
    for _ in range(40):
        for batch in loader:
            optimizer.zero_grad()
            classifier.loss(batch).backward()
            optimizer.step()
    classifier.eval()
    batch = classifier.collate(examples(test, TASK), train=False)
    probs = classifier.predict_proba(batch)
    assert torch.allclose(probs.sum(-1), torch.ones(len(test)), atol=1e-5)
    balanced = multiclass_accuracy(
        probs.argmax(-1), batch["class_label"], num_classes=4, average="macro"
    ).item()
    print(
        f"probe: {len(train)} train / {len(test)} held-out images, balanced accuracy {balanced:.3f}"
    )
    assert balanced > 0.45  # chance is 0.25 (4 classes)


def test_second_run_reads_the_cache_and_never_calls_the_encoder(tiny, scan, tmp_path):
    records = [r for r in scan.records if label_of(r, TASK) is not None][:24]
    paths = [r.path for r in records]
    first = probe(tiny, tmp_path / "emb")
    counter = CallCounter(first.encoder)
    assert first.prepare_embeddings(paths, scan.root, batch_size=8) == len(paths)
    assert counter.calls == 3  # 24 images in batches of 8
    expected = first.collate(examples(records, TASK), train=False)["embeddings"]

    # A later run of the sweep (another learning rate) builds the same classifier afresh.
    second = probe(tiny, tmp_path / "emb")
    counter = CallCounter(second.encoder)
    assert second.prepare_embeddings(paths, scan.root) == 0
    batch = second.collate(examples(records, TASK), train=True)
    optimizer = torch.optim.SGD(second.head.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        second.loss(batch).backward()
        optimizer.step()
    second.predict_proba(batch)
    assert counter.calls == 0
    assert torch.equal(batch["embeddings"], expected)


def test_preprocessing_change_or_edited_image_invalidates(tiny, scan, tmp_path):
    records = [r for r in scan.records if label_of(r, TASK) is not None][:6]
    paths = [r.path for r in records]
    root = tmp_path / "data"  # a private copy: the shared replica's files stay untouched
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(scan.root / path, root / path)
    padded = probe(tiny, tmp_path / "emb", resize="pad")
    padded.prepare_embeddings(paths, root)

    stretched = probe(tiny, tmp_path / "emb", resize="stretch")
    counter = CallCounter(stretched.encoder)
    assert stretched.prepare_embeddings(paths, root) == len(paths)
    assert counter.calls > 0
    assert stretched.embedding_cache.key != padded.embedding_cache.key
    a = padded.collate(examples(records, TASK), train=False)["embeddings"]
    b = stretched.collate(examples(records, TASK), train=False)["embeddings"]
    assert not torch.allclose(a, b)  # replica images are not square: the pixels differ

    # Touching one file (new mtime) recomputes that image only.
    file = root / paths[0]
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = probe(tiny, tmp_path / "emb", resize="pad")
    assert again.prepare_embeddings(paths, root) == 1


def test_collate_without_prepared_embeddings_names_the_fix(tiny, scan):
    classifier = probe(tiny, None)  # memory-only cache
    records = [r for r in scan.records if label_of(r, TASK) is not None][:2]
    with pytest.raises(KeyError, match="prepare_embeddings"):
        classifier.collate(examples(records, TASK), train=True)
    classifier.prepare_embeddings([r.path for r in records], scan.root)
    assert classifier.collate(examples(records, TASK), train=True)["embeddings"].shape == (2, 32)


def test_probe_trains_only_the_head_and_saves_it(tiny, tmp_path):
    classifier = probe(tiny, None)
    names = [n for n, p in classifier.named_parameters() if p.requires_grad]
    assert names == ["head.weight", "head.bias"]
    torch.nn.init.normal_(classifier.head.weight)
    classifier.save_trained(tmp_path / "ckpt")
    other = probe(tiny, None)
    other.load_trained(tmp_path / "ckpt")
    assert torch.equal(other.head.weight, classifier.head.weight)


def test_cache_shards_are_merged_and_values_kept(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    paths = [f"img{i}.png" for i in range(20)]
    for i, path in enumerate(paths):
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(root / path)
    calls = []

    def encode(images):  # the red channel as a 1-d "embedding"
        calls.append(len(images))
        return torch.tensor([[float(im.getpixel((0, 0))[0])] for im in images])

    identity = {"checkpoint": "fake", "preprocessing": {}}
    cache = EmbeddingCache(tmp_path / "emb", identity)
    cache.get_or_compute(paths, root, encode, batch_size=1, shard_size=1)  # one shard per image
    assert len(list(cache.directory.glob("shard-*.safetensors"))) == 20 > MAX_SHARDS
    again = EmbeddingCache(tmp_path / "emb", identity)
    table, computed = again.get_or_compute(paths, root, encode)
    assert computed == 0 and sum(calls) == 20
    assert len(list(again.directory.glob("shard-*.safetensors"))) == 1
    assert table.lookup(["img3.png", "img7.png"]).flatten().tolist() == [30.0, 70.0]
