"""Training: multi-task pre-training, few-shot adaptation and zero-shot MHR-mu, producing `mhr` bundles."""
