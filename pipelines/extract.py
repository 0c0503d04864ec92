"""``python -m pipelines.extract``: the entry point of ``igpt.eval.extract_job`` (its config and its logic)."""

from pipelines import entry

main = entry("extract")

if __name__ == "__main__":
    main()
