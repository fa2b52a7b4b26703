"""MedGemma (Gemma 3) as a Classifier: prompt -> answer, answer-only loss, label scoring.

Training batches hold the prompt and the class's answer, right padded; the loss counts the answer
and the end of turn (`loss_on=answer`) or, as the blog notebook's collator did, every token but
padding, `<start_of_image>` and the image soft tokens, on the templated text stripped of its final
newline (`loss_on=all_text`). Evaluation scores every class's answer from one forward pass over
the prompt. A frozen vision tower and projector run without autograd, whatever gradient
checkpointing does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from PIL import Image
from transformers import Gemma3ForConditionalGeneration, PreTrainedModel, ProcessorMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling

from breakhis_ft.models.base import Batch, Classifier, processor_side
from breakhis_ft.models.lora import count_parameters, merged_weights
from breakhis_ft.models.prompts import ClassPrompt, make_prompt
from breakhis_ft.models.siglip_loading import checkpoint_identity
from breakhis_ft.models.vision_cache import (
    PromptTokens,
    VisionFeatureStore,
    configure_feature_cache,
    feature_identity,
)

END_OF_TURN = "<end_of_turn>"
SCORING = ("auto", "first_token", "sequence")
EVAL_MODES = ("score", "generate", "both")


@dataclass(frozen=True)
class FinalEvaluation:
    """How a run's final evaluation classifies with MedGemma (`model.eval_mode`, ...)."""

    mode: str = "score"  # score (label likelihoods) | generate (parsed answers) | both
    max_new_tokens: int = 40  # generation's limit
    merge_adapter: bool = False  # merge a LoRA adapter into the weights first (the blog's)


class MedGemmaClassifier(Classifier):
    """A Gemma 3 image-text model (optionally with a peft adapter) classifying by its answer."""

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        processor: ProcessorMixin,
        prompt: ClassPrompt,
        loss_on: str = "answer",
        scoring: str = "auto",
        evaluation: FinalEvaluation = FinalEvaluation(),
        add_special_tokens: bool = False,
    ) -> None:
        super().__init__()
        if loss_on not in ("answer", "all_text"):
            raise ValueError(f"model.loss_on: got {loss_on!r}, allowed: answer, all_text")
        if scoring not in SCORING:
            raise ValueError(f"scoring: got {scoring!r}, allowed: {', '.join(SCORING)}")
        if evaluation.mode not in EVAL_MODES:
            raise ValueError(
                f"model.eval_mode: got {evaluation.mode!r}, allowed: {', '.join(EVAL_MODES)}"
            )
        self.model = model
        self.processor = processor
        self.prompt = prompt
        self.class_names = prompt.class_names
        self.loss_on = loss_on
        self.scoring = scoring
        self.evaluation = evaluation
        self.eval_mode = evaluation.mode
        self.max_new_tokens = evaluation.max_new_tokens
        # the processor's own special tokens on top of the template's (model.add_special_tokens)
        self.add_special_tokens = add_special_tokens
        tok = processor.tokenizer
        self.end_of_turn_id = tok.convert_tokens_to_ids(END_OF_TURN)
        # what all_text leaves out of the loss: the blog masked these two, not <end_of_image>
        self.image_token_ids = {tok.image_token_id, tok.boi_token_id}
        self.prompt_text = processor.apply_chat_template(
            prompt.messages(), add_generation_prompt=True, tokenize=False
        )
        self.train_texts: list[str] = []
        self.tail_ids: list[list[int]] = []  # answer + end of turn (+ what the template adds)
        self.answer_ids: list[list[int]] = []  # answer + end of turn: the trained tokens
        for answer in prompt.answers:
            text = processor.apply_chat_template(prompt.messages(answer), tokenize=False)
            if loss_on == "all_text":  # the blog collator's `.strip()`: no newline trained
                text = text.rstrip()
            if not text.startswith(self.prompt_text):
                raise ValueError("the chat template does not extend the prompt with the answer")
            tail = tok(text[len(self.prompt_text) :], add_special_tokens=False)["input_ids"]
            if self.end_of_turn_id not in tail:
                raise ValueError(f"the chat template does not close the answer with {END_OF_TURN}")
            self.train_texts.append(text)
            self.tail_ids.append(tail)
            self.answer_ids.append(tail[: tail.index(self.end_of_turn_id) + 1])
        first = [ids[0] for ids in self.answer_ids]
        self.first_tokens_distinct = len(set(first)) == len(first)
        self.feature_store: VisionFeatureStore | None = None
        # token rows of cached-feature batches, tokenised as the image batches are
        self.prompt_tokens = PromptTokens(processor, add_special_tokens)

    # ---- the model underneath -------------------------------------------------------------------

    @property
    def core(self) -> Gemma3ForConditionalGeneration:
        """The Gemma 3 model (inside the peft wrapper, adapters injected in place)."""
        if isinstance(self.model, PeftModel):
            return self.model.get_base_model()
        return self.model

    @property
    def vision_trainable(self) -> bool:
        """Whether any vision tower or projector parameter trains (e.g. all-linear LoRA)."""
        inner = self.core.model
        modules = (inner.vision_tower, inner.multi_modal_projector)
        return any(p.requires_grad for m in modules for p in m.parameters())

    @property
    def device(self) -> torch.device:
        """The device of the model's input embeddings."""
        return self.core.get_input_embeddings().weight.device

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts (4-bit weights counted unpacked)."""
        return count_parameters(self.model)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the language model's layers (and the vision tower's only when it trains)."""
        # Checkpointing the whole model also hooks the frozen SigLIP tower's inputs to require
        # grad, so backward would run through it for nothing; limit it to what trains.
        target = self.core if self.vision_trainable else self.core.model.language_model
        enable = getattr(target, "activation_checkpointing_enable", None)
        if enable is None:  # transformers < 5.x naming
            enable = target.gradient_checkpointing_enable
        enable({"use_reentrant": False})

    # ---- batches --------------------------------------------------------------------------------

    def collate(self, examples: list[dict[str, Any]], train: bool) -> Batch:
        """Processor batch (right padded, token_type_ids kept) with labels when training."""
        classes = [int(ex["label"]) for ex in examples]
        texts = [self.train_texts[c] if train else self.prompt_text for c in classes]
        if self.feature_store is not None:
            batch = self.prompt_tokens(texts)
            batch["image_features"] = self.feature_store.lookup([ex["path"] for ex in examples])
        else:
            if any(ex.get("image") is None for ex in examples):
                raise ValueError(
                    "MedGemma batches need the images (dataset with_images=True) unless vision "
                    "features are cached (classifier.use_feature_cache)"
                )
            images = [[ex["image"].convert("RGB")] for ex in examples]  # one list per prompt
            batch = dict(
                self.processor(
                    text=texts,
                    images=images,
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    # false: the chat template's <bos> only (true: the blog notebook's call)
                    add_special_tokens=self.add_special_tokens,
                )
            )
        if train:
            batch["labels"] = self._labels(batch, classes)
        batch["class_label"] = torch.tensor(classes, dtype=torch.long)
        batch["index"] = torch.tensor([int(ex["index"]) for ex in examples], dtype=torch.long)
        return batch

    def _labels(self, batch: Batch, classes: list[int]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, -100)
        if self.loss_on == "all_text":
            labels = ids.masked_fill(mask == 0, -100)
            for token in self.image_token_ids:
                labels = labels.masked_fill(ids == token, -100)
            return labels
        for row, cls in enumerate(classes):
            end = int(mask[row].sum())
            tail = torch.tensor(self.tail_ids[cls])
            start = end - len(tail)
            if not torch.equal(ids[row, start:end], tail):
                raise RuntimeError(
                    "the answer tokenizes differently inside the prompt than alone; the prompt's "
                    "last characters merge with the answer (check model.prompt and the template)"
                )
            n = len(self.answer_ids[cls])
            labels[row, start : start + n] = ids[row, start : start + n]
        return labels

    def _to_device(self, batch: Batch) -> Batch:
        device = self.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ---- forward --------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image soft tokens (batch, tokens, hidden); no autograd if vision is frozen."""
        pixel_values = pixel_values.to(self.core.dtype)
        if self.vision_trainable:
            return self.core.model.get_image_features(pixel_values).pooler_output
        with torch.no_grad():
            return self.core.model.get_image_features(pixel_values).pooler_output

    def _batch_features(self, batch: Batch) -> torch.Tensor:
        """The batch's cached image features, or the vision tower's on its pixel values."""
        if "image_features" in batch:
            return batch["image_features"]
        return self.image_features(batch["pixel_values"])

    def hidden_states(self, batch: Batch, features: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states of the language model, image tokens filled with the image features."""
        if features is None:
            features = self._batch_features(batch)
        out = self.core.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],  # image tokens attend to each other
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
            use_cache=False,
        )
        return out.last_hidden_state

    def forward(self, batch: Batch) -> torch.Tensor:
        """The training loss (so a DDP-wrapped classifier is called like any module)."""
        return self.loss(batch)

    def loss(self, batch: Batch, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Causal-LM cross-entropy over the labelled tokens, optionally weighted by class."""
        batch = self._to_device(batch)
        labels = batch["labels"]
        hidden = self.hidden_states(batch)
        # Position p predicts token p+1; projecting only the labelled positions onto the 262k-word
        # vocabulary saves most of the output layer's compute and memory.
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.core.lm_head(hidden[:, :-1][keep]).float()
        if class_weights is None:
            return F.cross_entropy(logits, targets[keep])
        # Each token weighs as its example's class; normalised like F.cross_entropy(weight=...).
        row_weight = class_weights.to(logits)[batch["class_label"]]
        weight = row_weight[:, None].expand_as(targets)[keep]
        token_loss = F.cross_entropy(logits, targets[keep], reduction="none")
        return (weight * token_loss).sum() / weight.sum()

    @staticmethod
    def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
        """Index of each row's last real token under right padding (not the last column)."""
        return attention_mask.long().sum(dim=1) - 1

    @torch.no_grad()
    def predict_proba(self, batch: Batch) -> torch.Tensor:
        """P(class | image, prompt) from the likelihood of each class's answer; rows sum to 1."""
        if "labels" in batch:
            raise ValueError(
                "predict_proba needs a prompt-only batch: collate(examples, train=False)"
            )
        batch = self._to_device(batch)
        method = self.scoring
        if method == "auto":
            method = "first_token" if self.first_tokens_distinct else "sequence"
        if method == "first_token":
            if not self.first_tokens_distinct:
                raise ValueError("first_token scoring needs answers with distinct first tokens")
            hidden = self.hidden_states(batch)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = hidden[rows, self.last_real_index(batch["attention_mask"])]
            logits = self.core.lm_head(last).float()
            first = torch.tensor([ids[0] for ids in self.answer_ids], device=logits.device)
            return logits[:, first].softmax(dim=-1)
        return self._sequence_scores(batch).softmax(dim=-1)

    def _sequence_scores(self, batch: Batch) -> torch.Tensor:
        """Sum of log-probabilities of each class's full answer + end of turn, (batch, classes)."""
        features = self._batch_features(batch)  # once for all classes
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        lengths = mask.long().sum(dim=1)
        pad = self.processor.tokenizer.pad_token_id
        scores = []
        for answer in self.answer_ids:
            n = len(answer)
            answer_t = torch.tensor(answer, device=ids.device)
            width = ids.shape[1] + n
            new_ids = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
            new_mask = torch.zeros_like(new_ids)
            new_types = torch.zeros_like(new_ids)
            for row, length in enumerate(lengths.tolist()):
                new_ids[row, :length] = ids[row, :length]
                new_ids[row, length : length + n] = answer_t
                new_mask[row, : length + n] = 1
                new_types[row, :length] = types[row, :length]
            hidden = self.hidden_states(
                {"input_ids": new_ids, "attention_mask": new_mask, "token_type_ids": new_types},
                features=features,
            )
            # Token at position length+j is predicted at position length+j-1.
            positions = lengths[:, None] - 1 + torch.arange(n, device=ids.device)[None, :]
            picked = hidden[torch.arange(ids.shape[0], device=ids.device)[:, None], positions]
            logprobs = self.core.lm_head(picked).float().log_softmax(dim=-1)
            wanted = answer_t.expand(ids.shape[0], n)[..., None]
            scores.append(logprobs.gather(-1, wanted).squeeze(-1).sum(dim=1))
        return torch.stack(scores, dim=1)

    # ---- generation (for comparison with published numbers) ------------------------------------

    @torch.no_grad()
    def generate_answers(self, batch: Batch, max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers to a prompt-only batch (re-padded on the left, as generation needs)."""
        if "pixel_values" not in batch:
            raise ValueError(
                "generate_answers needs pixel values: collate without the vision feature cache "
                "(classifier.feature_store = None, dataset with_images=True)"
            )
        batch = self._to_device(batch)
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        # Move each row's padding to the left: roll it right by its number of pad tokens.
        shifts = (ids.shape[1] - mask.long().sum(dim=1)).tolist()
        ids, mask, types = (
            torch.stack([t[row].roll(s) for row, s in enumerate(shifts)])
            for t in (ids, mask, types)
        )
        tok = self.processor.tokenizer
        out = self.core.generate(
            input_ids=ids,
            attention_mask=mask,
            token_type_ids=types,
            pixel_values=batch["pixel_values"].to(self.core.dtype),
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=False,
            eos_token_id=[tok.eos_token_id, self.end_of_turn_id],
            pad_token_id=tok.pad_token_id,
        )
        return tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

    def parse_answers(self, answers: list[str]) -> torch.Tensor:
        """Class index of each generated answer; -1 where it names no class (counted as wrong)."""
        return torch.tensor([self.prompt.parse(a) for a in answers], dtype=torch.long)

    # ---- the final evaluation -------------------------------------------------------------------

    def merge_adapter(self) -> bool:
        """Merge a LoRA adapter into the weights (peft merge_and_unload), as the blog evaluated;
        True when there was one. The saved adapter is not touched."""
        if not isinstance(self.model, PeftModel):
            return False
        self.model = self.model.merge_and_unload()
        return True

    def prepare_final_evaluation(self) -> bool:
        """Merge the adapter where `model.merge_for_eval` asks; True when it was merged."""
        return self.evaluation.merge_adapter and self.merge_adapter()

    # ---- cached vision features -----------------------------------------------------------------

    def configure_run_caches(self, cfg: Any, stain_identity: str | None = None) -> None:
        """Cached soft tokens where `model.cache_vision_features` and the config allow them, those
        of stain-normalised images apart (vision_cache.configure_feature_cache)."""
        configure_feature_cache(self, cfg, stain_identity)

    def use_feature_cache(
        self, cache_dir: str | Path, name_or_path: str, image_size: int | None
    ) -> VisionFeatureStore:
        """Collate cached soft tokens (looked up by `path`) instead of pixel values from now on;
        the cache key holds what they depend on: checkpoint, processor, preprocessing, dtype."""
        if self.vision_trainable:
            raise ValueError(
                "vision features cannot be cached while the vision tower or projector trains "
                "(peft.target_modules=all-linear or peft=none without model.freeze_vision)"
            )
        checkpoint = checkpoint_identity(name_or_path, self.core.config)
        identity = feature_identity(
            checkpoint, self.processor.image_processor, image_size, self.core.dtype
        )
        self.feature_store = VisionFeatureStore(cache_dir, identity)
        return self.feature_store

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Soft tokens (N, tokens, hidden) of preprocessed PIL images, in the model's dtype."""
        pixel_values = self.processor.image_processor(
            [image.convert("RGB") for image in images], return_tensors="pt"
        )["pixel_values"]
        return self.image_features(pixel_values.to(self.device))

    @property
    def input_side(self) -> int | None:
        """The square the Gemma 3 image processor resizes to (896 for MedGemma)."""
        return processor_side(self.processor.image_processor)

    @property
    def needs_images(self) -> bool:
        """With the vision feature cache, batches carry soft tokens instead of images."""
        return self.feature_store is None

    def prepare_cached_inputs(self, datasets: Sequence[Any], data_root: str | Path) -> int:
        """Compute the missing cached features of every image of `datasets` (ImageDataset:
        `records`, `load(i)`); returns how many were computed (0 without the cache)."""
        if self.feature_store is None:
            return 0
        computed = 0
        was_training = self.training
        self.eval()
        try:
            for dataset in datasets:
                paths = [r.path for r in dataset.records]
                computed += self.feature_store.fill(
                    paths, data_root, dataset.load, self.encode_images
                )
        finally:
            self.train(was_training)
        return computed

    # ---- checkpoints ----------------------------------------------------------------------------

    def save_trained(self, directory: str | Path) -> None:
        """Save the adapter (peft save_pretrained, safetensors), or a full fine-tune's weights."""
        if isinstance(self.model, PeftModel):
            self.model.save_pretrained(str(directory), safe_serialization=True)
        else:
            super().save_trained(directory)

    def load_trained(self, directory: str | Path) -> None:
        """Restore what `save_trained` wrote into this model."""
        if not isinstance(self.model, PeftModel):
            super().load_trained(directory)
            return
        weights = load_peft_weights(str(directory), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if result.unexpected_keys:
            raise KeyError(f"adapter keys not in the model: {result.unexpected_keys[:5]}")

    # ---- export ---------------------------------------------------------------------------------

    @classmethod
    def answer_details(cls, model_cfg: Any, class_names: Sequence[str]) -> dict[str, Any]:
        """The exact user text, chat messages (image first) and each class's answer string."""
        prompt = make_prompt(model_cfg.prompt, tuple(class_names))
        return {
            "user_text": prompt.user_text(),
            "messages": prompt.messages(),
            "answers": [
                {"class": name, "answer": answer}
                for name, answer in zip(prompt.class_names, prompt.answers, strict=True)
            ],
            # each class's probability: the softmax over the first tokens of the answers, read at
            # the last prompt position (the answers start with distinct tokens: digits or letters)
            "scoring": "softmax over the answers' first tokens after the generation prompt",
        }

    def save_merged(self, out_dir: str | Path, dtype: torch.dtype) -> None:
        """The Gemma 3 model with any adapter merged in (QLoRA: dequantized), and its processor."""
        merged_weights(self.model).to(dtype).save_pretrained(str(out_dir))  # safetensors
        self.processor.save_pretrained(str(out_dir))
