"""Model code usable without a stage: weight resolution and pinning, and each model with explicit arguments."""
