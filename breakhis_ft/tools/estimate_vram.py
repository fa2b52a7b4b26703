"""Estimate the GPU memory of a training run from the same overrides as the run.

python scripts/estimate_vram.py experiment=medgemma_lora_100x trainer.batch_size=4
python scripts/estimate_vram.py model=medgemma_4b_it peft=qlora --json vram.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from breakhis_ft.config import register_configs
from breakhis_ft.validate import validate_config
from breakhis_ft.vram import estimate_vram

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str] | None = None) -> int:
    """Compose the config from the overrides, print the estimate table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for breakhis-ft")
    parser.add_argument("--json", type=Path, help="also write the estimate to this JSON file")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw_8bit"))
    parser.add_argument("--config-dir", type=Path, default=CONF, help="the conf/ folder")
    args = parser.parse_args(argv)
    register_configs()
    with initialize_config_dir(config_dir=str(args.config_dir.resolve()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    checked = cfg.copy()  # the estimate reads no data: a missing data.root is not an error here
    if checked.data.root is None:
        checked.data.root = "unused-by-the-estimate"
    validate_config(checked)
    estimate = estimate_vram(cfg, device=args.device, optimizer=args.optimizer)
    print(estimate.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(estimate.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
