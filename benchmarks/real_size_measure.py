"""Measuring tools of the real-size benchmark (real_size.py): phases (wall time, peak RSS), the
bytes autograd saves, the layer inputs gradient checkpointing keeps, tensor bytes, the CPU's bf16
matmul rate, and the stand-in Gemma 3 tokenizer with the real vocabulary size and special-token
ids."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import GemmaTokenizer

from breakhis_ft.models.tiny import _corpus_words, _vocab_and_merges, gemma_tokenizer

GIB = 2**30
VOCAB = 262_208  # google/medgemma-4b-it's vocabulary (docs/references.md)
# the ids google/medgemma-4b-it's tokenizer gives these tokens (docs/references.md; the config's
# eos)
REAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
    "<start_of_image>": 255_999,
    "<end_of_image>": 256_000,
    "<image_soft_token>": 262_144,
}


def standin_tokenizer() -> GemmaTokenizer:
    """A Gemma tokenizer of 262,208 tokens with the real special ids; the prompts' words as tokens
    (the tiny model's BPE), every other id an unused placeholder."""
    small, merges = _vocab_and_merges(_corpus_words())
    vocab = dict(REAL_IDS)
    taken = set(REAL_IDS.values())
    free = (i for i in range(VOCAB) if i not in taken)
    for token in small:
        if token not in vocab:
            vocab[token] = next(free)
    vocab.update({f"<unused{i}>": i for i in free})
    tokenizer = gemma_tokenizer(vocab, merges)
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in REAL_IDS}
    if got != REAL_IDS or len(tokenizer) != VOCAB:
        raise RuntimeError(f"stand-in tokenizer: ids {got}, {len(tokenizer)} tokens")
    return tokenizer


def _vm_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@contextmanager
def phase(results: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Record a phase's wall time and peak resident memory (VmHWM, reset at its start)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak RSS counter to the current RSS
    entry: dict[str, Any] = {"start_rss_gib": round(_vm_kib("VmRSS") / 2**20, 3)}
    start = time.perf_counter()
    yield entry
    entry["wall_s"] = round(time.perf_counter() - start, 2)
    entry["peak_rss_gib"] = round(_vm_kib("VmHWM") / 2**20, 3)
    results[name] = entry
    print(f"  {name}: {entry['wall_s']} s, peak RSS {entry['peak_rss_gib']} GiB", flush=True)


def rate(entry: dict[str, Any], flops: float, peak: float) -> None:
    """Add a phase's FLOPs, achieved FLOP/s and its share of the bf16 matmul rate (CPU "MFU")."""
    entry["flops"] = flops
    entry["achieved_flop_per_s"] = flops / entry["wall_s"]
    entry["cpu_mfu"] = round(entry["achieved_flop_per_s"] / peak, 4)


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages of `tensors` (views and tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


class SavedTensors:
    """Bytes of the distinct non-parameter tensors autograd saves while active (kept alive)."""

    def __init__(self, model: nn.Module, held: Iterable[torch.Tensor] = ()) -> None:
        # parameters, and tensors already held elsewhere (`held`), are not counted
        tensors = [*model.parameters(), *held]
        self.params = {t.untyped_storage().data_ptr() for t in tensors}
        self.seen: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen[key] = t.untyped_storage().nbytes()
        return t

    @contextmanager
    def active(self) -> Iterator[SavedTensors]:
        """Record inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    @property
    def bytes(self) -> int:
        """Total bytes recorded."""
        return sum(self.seen.values())


class LayerInputs:
    """The tensors each decoder layer is called with: what non-reentrant checkpointing keeps."""

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.handles = [
            layer.register_forward_pre_hook(self._record, with_kwargs=True) for layer in layers
        ]

    def _record(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append((args, kwargs))

    def storages(self) -> dict[int, int]:
        """Bytes by storage of everything the calls hold (shared tensors once)."""
        return {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors()
        }

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor argument of every call (shared masks and position embeddings included)."""
        out = [a for args, _ in self.calls for a in args if torch.is_tensor(a)]
        for _, kwargs in self.calls:
            for value in kwargs.values():
                items = value if isinstance(value, tuple) else (value,)
                out += [v for v in items if torch.is_tensor(v)]
        return out

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()


def layer_saved_bytes(layer: nn.Module, call: tuple[tuple, dict], autocast: Any) -> int:
    """Bytes one decoder layer's forward saves for backward when it is recomputed: run alone,
    without checkpointing, its input requiring grad (as every layer's after the first does); what
    it was called with (input, masks, position embeddings) is held already and not counted."""
    args, kwargs = call
    args = (args[0].detach().requires_grad_(True), *args[1:])
    inputs = LayerInputs(())
    inputs.calls.append((args, kwargs))
    saved = SavedTensors(layer, held=inputs.tensors())
    flag = getattr(layer, "gradient_checkpointing", False)
    layer.gradient_checkpointing = False
    try:
        with saved.active(), autocast:
            layer(*args, **kwargs)
    finally:
        layer.gradient_checkpointing = flag
    return saved.bytes


def matmul_flops_per_s(n: int = 4096, repeats: int = 3) -> float:
    """This machine's bf16 matmul rate (n x n @ n x n, best of `repeats`), FLOP/s."""
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    torch.mm(a, b)  # warm up (oneDNN picks its kernel)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters, gradients and optimizer states, as tensor bytes (what estimate_vram counts)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    states = [t for s in optimizer.state.values() for t in s.values()]
    parts = {
        "weights_bytes": storage_bytes(model.parameters()),
        "gradients_bytes": storage_bytes(p.grad for p in trainable),
        "optimizer_states_bytes": storage_bytes(states),
    }
    parts["static_bytes"] = sum(parts.values())
    return parts
