"""Model stage: Classifiers (MedGemma + LoRA, SigLIP encoder + head) behind one interface."""
