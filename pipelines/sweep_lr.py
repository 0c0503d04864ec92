"""``python -m pipelines.sweep_lr``: the entry point of ``igpt.train.sweep_lr_job`` (its config and its logic)."""

from pipelines import entry

main = entry("sweep_lr")

if __name__ == "__main__":
    main()
