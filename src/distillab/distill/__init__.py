"""Distillation: the losses (pure functions and small modules) and the LightningModules."""
