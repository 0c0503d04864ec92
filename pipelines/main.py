"""``python -m pipelines.main``: the entry point of ``igpt.study.main_job`` (its config and its logic)."""

from pipelines import entry

main = entry("main")

if __name__ == "__main__":
    main()
