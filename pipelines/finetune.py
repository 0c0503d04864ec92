"""``python -m pipelines.finetune``: the entry point of ``igpt.train.finetune_job`` (its config and its logic)."""

from pipelines import entry

main = entry("finetune")

if __name__ == "__main__":
    main()
