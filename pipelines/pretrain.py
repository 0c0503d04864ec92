"""``python -m pipelines.pretrain``: the entry point of ``igpt.train.pretrain_job`` (its config and its logic)."""

from pipelines import entry

main = entry("pretrain")

if __name__ == "__main__":
    main()
