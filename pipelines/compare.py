"""``python -m pipelines.compare``: the entry point of ``igpt.track.compare`` (also ``python -m igpt compare``)."""

from pipelines import entry

main = entry("compare")

if __name__ == "__main__":
    main()
