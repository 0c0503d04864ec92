"""``python -m pipelines.probe``: the entry point of ``igpt.eval.probe_job`` (its config and its logic)."""

from pipelines import entry

main = entry("probe")

if __name__ == "__main__":
    main()
