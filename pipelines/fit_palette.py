"""``python -m pipelines.fit_palette``: the entry point of ``igpt.data.fit_palette_job`` (its config and its logic)."""

from pipelines import entry

main = entry("fit_palette")

if __name__ == "__main__":
    main()
