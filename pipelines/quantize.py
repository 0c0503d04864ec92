"""``python -m pipelines.quantize``: the entry point of ``igpt.data.quantize_job`` (its config and its logic)."""

from pipelines import entry

main = entry("quantize")

if __name__ == "__main__":
    main()
