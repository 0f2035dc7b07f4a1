"""Training and evaluation over a pair store or in-process pairs: every default (config), the
solver loop (loop), the model file (model), store-level training (train) and evaluation."""
