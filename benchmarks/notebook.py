"""The published recipes re-created with trl, for the peer benchmark (no breakhis_ft imports).

- The seed blog notebook (MedGemma 4B on BreakHis; docs/references.md): `SFTTrainer` + `SFTConfig`
  with its settings (batch 1 x grad accumulation 8, lr 5e-4 cosine, warmup 3%, max_grad_norm 0.3,
  gradient checkpointing without reentrancy, paged 8-bit AdamW), LoRA r=8 / alpha 16 / dropout 0.1
  on all linear layers, its collator (chat template + processor on the PNGs every step, labels
  masked only on padding, <start_of_image> and image soft tokens), then the adapter merged and
  greedy generation (max_new_tokens 40, right padding) parsed with the regex `\\b([0-7])\\b`
  (unparseable = wrong). Images come as a `datasets` Image column over the PNG files, as the
  notebook's Kaggle loader builds it, so every access decodes the PNG.
- Google's QLoRA notebook (docs/references.md): a 4-bit NF4 base (bitsandbytes, CPU-capable from
  0.49), eager attention, LoRA r=16 / alpha 16 / dropout 0.05 on all linear layers with
  `modules_to_save=["lm_head", "embed_tokens"]`, batch 4 x 4, lr 2e-4 linear, fused AdamW, the
  same collator pattern (`.convert("RGB")`), lettered options with the full option as target,
  evaluation by greedy generation (max_new_tokens 20, left padding) and an exact match.

What differs from the notebooks, and why: on a CPU the model is float32 and `bf16=False` for the
blog recipe (the notebook's own script does exactly this without CUDA); checkpoints and the
per-epoch evaluation loss are off (`save_strategy="no"`, `eval_strategy="no"`): bookkeeping that
would only add to the notebook's time; the merge is done in memory instead of reloading from disk.
trl 1.x computes the loss with its fused LM head (on a CPU it projects every position, as the
notebook's trl 0.x did with the model's own loss).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import LoraConfig
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer

BLOG_CLASSES = (
    "benign_adenosis",
    "benign_fibroadenoma",
    "benign_phyllodes_tumor",
    "benign_tubular_adenoma",
    "malignant_ductal_carcinoma",
    "malignant_lobular_carcinoma",
    "malignant_mucinous_carcinoma",
    "malignant_papillary_carcinoma",
)
BLOG_PROMPT = (
    "Analyze this breast tissue histopathology image and classify it.\n\nClasses (0-7):\n"
    + "\n".join(f"{i}: {name}" for i, name in enumerate(BLOG_CLASSES))
    + "\n\nAnswer with only the number (0-7):"
)
GOOGLE_OPTIONS = tuple(
    f"{letter}: {name.split('_', 1)[1].replace('_', ' ')}"
    for letter, name in zip("ABCDEFGH", BLOG_CLASSES, strict=True)
)
GOOGLE_PROMPT = "What is the most likely tissue type shown in the histopathology image?\n" + (
    "\n".join(GOOGLE_OPTIONS)
)
IMAGE_SOFT_TOKEN = 262144  # MedGemma's id, hard-coded in both notebooks' collators


def user_message(prompt: str) -> dict[str, Any]:
    """The user turn: the image, then the prompt text."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}


def format_messages(prompt: str, answer: str) -> list[dict[str, Any]]:
    """The notebooks' `format_data`: user (image + prompt), then the assistant's answer."""
    return [
        user_message(prompt),
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def notebook_dataset(paths: Sequence[str], labels: Sequence[int], google: bool = False):
    """A `datasets` Image column over the PNG files plus chat messages (decoded on each access)."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(BLOG_CLASSES))}
    )
    data = datasets.Dataset.from_dict(
        {"image": [str(p) for p in paths], "label": list(labels)}, features=features
    )
    prompt = GOOGLE_PROMPT if google else BLOG_PROMPT

    def format_data(example: dict) -> dict:
        answer = GOOGLE_OPTIONS[example["label"]] if google else str(example["label"])
        example["messages"] = format_messages(prompt, answer)
        return example

    return data.map(format_data)


def make_collate_fn(processor: Any, convert_rgb: bool = False):
    """The notebooks' collator: template + processor; labels masked on pad, boi, image tokens."""
    tok = processor.tokenizer
    boi = tok.convert_tokens_to_ids(tok.special_tokens_map["boi_token"])
    # The notebooks mask MedGemma's soft-token id (262144); the same token on this checkpoint.
    image_token = tok.convert_tokens_to_ids(tok.special_tokens_map.get("image_token", "")) or 0

    def collate_fn(examples: list[dict]) -> dict:
        texts, images = [], []
        for example in examples:
            image = example["image"].convert("RGB") if convert_rgb else example["image"]
            images.append([image])
            texts.append(
                processor.apply_chat_template(
                    example["messages"], add_generation_prompt=False, tokenize=False
                ).strip()
            )
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[labels == tok.pad_token_id] = -100
        labels[labels == boi] = -100
        labels[labels == IMAGE_SOFT_TOKEN] = -100
        labels[labels == image_token] = -100
        batch["labels"] = labels
        return batch

    return collate_fn


def load_model(path: str | Path, google: bool = False):
    """The base model as each notebook loads it (float32 on a CPU for the blog recipe)."""
    if google:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
        kwargs = {"dtype": torch.bfloat16, "attn_implementation": "eager"}
        kwargs["quantization_config"] = quant
    else:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    model = AutoModelForImageTextToText.from_pretrained(str(path), device_map="auto", **kwargs)
    return model, load_processor(path)


def load_processor(path: str | Path):
    """The checkpoint's processor as the notebook uses it (right padding)."""
    processor = AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "right"
    return processor


def lora_config(google: bool = False) -> LoraConfig:
    """The notebook's LoraConfig (blog: r=8; Google: r=16 + lm_head and embed_tokens copies)."""
    if google:
        return LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.05,
            bias="none",
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            modules_to_save=["lm_head", "embed_tokens"],
        )
    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        bias="none",
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def sft_config(out: str | Path, epochs: float, google: bool = False, **extra: Any) -> SFTConfig:
    """The notebook's SFTConfig (checkpoints and per-epoch eval loss off: see the module doc)."""
    common: dict[str, Any] = dict(
        output_dir=str(out),
        num_train_epochs=epochs,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_grad_norm=0.3,
        warmup_steps=0.03,  # transformers 5: a float < 1 is the warmup ratio
        save_strategy="no",
        eval_strategy="no",
        push_to_hub=False,
        report_to="none",
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
    )
    if google:
        recipe = dict(
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            gradient_accumulation_steps=4,
            optim="adamw_torch_fused",
            learning_rate=2e-4,
            lr_scheduler_type="linear",
            logging_steps=50,
            bf16=True,
            use_cpu=not torch.cuda.is_available(),  # transformers' bf16 on a CPU asks for it
        )
    else:
        recipe = dict(
            per_device_train_batch_size=1,
            gradient_accumulation_steps=8,
            optim="paged_adamw_8bit",
            learning_rate=5e-4,
            lr_scheduler_type="cosine",
            logging_steps=10,
            bf16=torch.cuda.is_available(),
        )
    return SFTConfig(**{**common, **recipe, **extra})


class EpochTimer(TrainerCallback):
    """Seconds of each training epoch (the Trainer's own epoch loop)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        """Stop the clock."""
        self.seconds.append(time.perf_counter() - self._start)


def train(
    path: str | Path,
    train_ds,
    out: str | Path,
    epochs: float,
    google: bool = False,
    seed: int = 42,
    callbacks: Sequence[TrainerCallback] = (),
):
    """Load, wrap and train as the notebook does (`seed`: the LoRA initialisation and the
    Trainer's; `callbacks` run after each epoch's clock); returns (trainer, processor, epoch
    seconds)."""
    model, processor = load_model(path, google)
    timer = EpochTimer()
    torch.manual_seed(seed)  # trl wraps the model in LoRA before the Trainer seeds itself
    trainer = SFTTrainer(
        model=model,
        args=sft_config(out, epochs, google, seed=seed),
        train_dataset=train_ds,
        peft_config=lora_config(google),
        data_collator=make_collate_fn(processor, convert_rgb=google),
        callbacks=[timer, *callbacks],
        # the blog passes no processing_class (trl loads it from the checkpoint); Google passes it
        **({"processing_class": processor} if google else {}),
    )
    trainer.train()
    return trainer, processor, timer.seconds


def merged_model(trainer, google: bool = False):
    """The blog merges the adapter into the base model; Google evaluates the adapter as is."""
    model = trainer.model if google else trainer.model.merge_and_unload()
    return model.eval()


def parse_blog(text: str) -> int:
    """The blog's parser: the first standalone digit 0-7, else -1 (counted as wrong)."""
    match = re.search(r"\b([0-7])\b", text.strip())
    return int(match.group(1)) if match else -1


def parse_google(text: str) -> int:
    """Google's fine-tuned parser: the whole answer must be one option string, else -1."""
    text = text.strip()
    return GOOGLE_OPTIONS.index(text) if text in GOOGLE_OPTIONS else -1


@torch.inference_mode()
def predict(model, processor, eval_ds, batch_size: int = 16, google: bool = False):
    """The notebook's batch_predict (greedy, answer parsed); returns (predictions, seconds,
    the generated texts)."""
    start = time.perf_counter()
    tok = processor.tokenizer
    tok.padding_side = "left" if google else "right"
    prompt = processor.apply_chat_template(
        [user_message(GOOGLE_PROMPT if google else BLOG_PROMPT)],
        add_generation_prompt=True,
        tokenize=False,
    )
    images = eval_ds["image"]  # the notebook reads (decodes) every test image here
    parse = parse_google if google else parse_blog
    predictions: list[int] = []
    texts: list[str] = []
    for i in range(0, len(images), batch_size):
        batch = [[img.convert("RGB") if google else img] for img in images[i : i + batch_size]]
        inputs = processor(
            text=[prompt] * len(batch), images=batch, padding=True, return_tensors="pt"
        ).to(model.device)
        outputs = model.generate(
            **inputs,
            max_new_tokens=20 if google else 40,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        # the blog cuts at each prompt's length (right padding); left padding: at the full width
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        if google:
            lengths = [inputs["input_ids"].shape[1]] * len(batch)
        for seq, length in zip(outputs, lengths, strict=True):
            texts.append(processor.decode(seq[length:], skip_special_tokens=True))
            predictions.append(parse(texts[-1]))
    tok.padding_side = "right"
    return predictions, time.perf_counter() - start, texts
