"""The record of one BreakHis image and the label sets of the tasks."""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any

import yaml

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

TUMOR_CLASSES = ("benign", "malignant")
# a slide (patient folder) id: a numeric stem and optional letters, e.g. 22549AB, 3411F, 13412
SLIDE_ID = re.compile(r"^(?P<stem>\d+)[A-Z]*$")


def stem_of(slide: str) -> str:
    """The numeric stem of a slide id (22549AB -> 22549, 0123 -> 123): sibling slides share it."""
    match = SLIDE_ID.match(str(slide))
    if match is None:
        raise ValueError(
            f"patient {slide!r} is not a BreakHis slide id (digits, then optional capital "
            "letters, e.g. 22549AB): its stem is unknown"
        )
    return str(int(match["stem"]))


@dataclass(frozen=True)
class Task:
    """What a run classifies: the record field that carries the class, and the classes in order.

    The standard tasks are the `task/` config group (conf/task/*.yaml): `load_task(name)` reads one.
    """

    name: str
    label_field: str  # subtype | tumor_class
    classes: tuple[str, ...]

    @classmethod
    def from_config(cls, task_cfg: Any) -> Task:
        """The task of a composed config's `task` node."""
        return cls(str(task_cfg.name), str(task_cfg.label_field), tuple(task_cfg.classes))

    def label_of(self, record: ImageRecord) -> int | None:
        """The class index of a record, or None when the task excludes it."""
        value = getattr(record, self.label_field)
        return self.classes.index(value) if value in self.classes else None


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


@functools.cache
def load_task(name: str) -> Task:
    """A standard task by name (subtype8, binary, eva4), read from its file in the task group."""
    path = files("breakhis_ft.conf").joinpath("task", f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"task={name!r}: no conf/task/{name}.yaml (subtype8, binary, eva4)")
    values = yaml.safe_load(path.read_text())
    return Task(str(values["name"]), str(values["label_field"]), tuple(values["classes"]))


def as_task(task: Task | str) -> Task:
    """A Task, or the standard task of that name."""
    return task if isinstance(task, Task) else load_task(task)


def class_names(task: Task | str) -> tuple[str, ...]:
    """The ordered class names of a task."""
    return as_task(task).classes


def label_of(record: ImageRecord, task: Task | str) -> int | None:
    """The class index of a record under a task, or None when the task excludes it."""
    return as_task(task).label_of(record)
