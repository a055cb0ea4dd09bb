"""Knowledge distillation family."""
