"""Training: multi-task pre-training and few-shot adaptation of MHR adapters (in progress)."""
