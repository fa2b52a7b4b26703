"""breakhis-ft: Hydra-configured fine-tuning of MedGemma and MedSigLIP on BreakHis."""

__version__ = "0.1.0"
