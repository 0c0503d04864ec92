"""``python -m pipelines.study``: the entry point of ``igpt.study.study_job`` (its config and its logic)."""

from pipelines import entry

main = entry("study")

if __name__ == "__main__":
    main()
