"""Training: the per-worker loops (``train_loop`` pretraining, ``finetune_loop``), checkpoints with their
completion markers, DeepSpeed configs and memory plans, the per-size recipes and schedules, run leases and test
faults."""
