"""The record of one BreakHis image and the label sets of the tasks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SUBTYPES: dict[str, tuple[str, str]] = {
    # folder name: (code in file names, benign|malignant)
    "adenosis": ("A", "benign"),
    "fibroadenoma": ("F", "benign"),
    "phyllodes_tumor": ("PT", "benign"),
    "tubular_adenoma": ("TA", "benign"),
    "ductal_carcinoma": ("DC", "malignant"),
    "lobular_carcinoma": ("LC", "malignant"),
    "mucinous_carcinoma": ("MC", "malignant"),
    "papillary_carcinoma": ("PC", "malignant"),
}

TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "subtype8": tuple(SUBTYPES),
    "binary": ("benign", "malignant"),
    # eva's 4 classes: those with at least 7 patients
    "eva4": ("tubular_adenoma", "mucinous_carcinoma", "fibroadenoma", "ductal_carcinoma"),
}


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is and what it shows."""

    path: str  # relative to the data root, POSIX separators
    tumor_class: str  # benign | malignant
    subtype: str  # folder name, e.g. ductal_carcinoma
    patient: str  # patient folder id, e.g. 22549AB
    stem: str  # numeric slide stem, e.g. 22549 (sibling slides share it)
    magnification: int  # 40 | 100 | 200 | 400
    seq: int  # sequence number in the file name

    def as_dict(self) -> dict:
        """The record as a plain dict (for CSV rows and datasets)."""
        return asdict(self)


def class_names(task: str) -> tuple[str, ...]:
    """The ordered class names of a task (subtype8, binary, eva4)."""
    if task not in TASK_CLASSES:
        raise ValueError(f"task.name={task!r} is not one of {', '.join(TASK_CLASSES)}")
    return TASK_CLASSES[task]


def label_of(record: ImageRecord, task: str) -> int | None:
    """The class index of a record under a task, or None when the task excludes it."""
    names = class_names(task)
    value = record.tumor_class if task == "binary" else record.subtype
    return names.index(value) if value in names else None
