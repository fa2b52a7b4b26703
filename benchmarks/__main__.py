"""`python -m benchmarks <name> [options]`: run one benchmark (`--help` after the name for its own).

python -m benchmarks bench         # scoring, feature and image caches; --gpu; --only peer
python -m benchmarks real-size     # MedGemma 4B and MedSigLIP-448: one real step on the CPU
python -m benchmarks stain-effect  # the demo with and without stain normalisation, by seed
python -m benchmarks stain-cost    # CPU seconds per 700x460 image of Macenko and Reinhard
python -m benchmarks compare-resamples  # resamples report --compare needs for a steady verdict
python -m benchmarks output-scale  # the stand-ins' logit bound and token-loss floor
python -m benchmarks peer-learning  # the peer stand-in's validation curve over more epochs
python -m benchmarks sigterm       # seconds from SIGTERM to exit, before/after the bounded stop
"""

from __future__ import annotations

import importlib
import sys

# name -> module whose `main(argv)` runs it; imported on demand (each pulls torch and more)
COMMANDS = {
    "bench": "benchmarks.bench",
    "real-size": "benchmarks.real_size",
    "stain-effect": "benchmarks.stain_effect",
    "stain-cost": "benchmarks.stain_cost",
    "compare-resamples": "benchmarks.compare_resamples",
    "output-scale": "benchmarks.output_scale",
    "peer-learning": "benchmarks.peer_learning",
    "sigterm": "benchmarks.sigterm",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the named benchmark's `main`; 2 with the list of names on a wrong one."""
    argv = sys.argv[1:] if argv is None else argv
    asked_help = bool(argv) and argv[0] in ("-h", "--help")
    if not argv or argv[0] not in COMMANDS:
        wrong = "" if not argv or asked_help else f"unknown benchmark {argv[0]!r}; "
        print(f"{__doc__}\n{wrong}benchmarks: {', '.join(COMMANDS)}", file=sys.stderr)
        return 0 if asked_help else 2
    sys.argv[0] = f"python -m benchmarks {argv[0]}"  # what argparse prints as the usage's program
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
