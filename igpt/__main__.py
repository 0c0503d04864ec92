"""``igpt``: small commands around the library. The jobs themselves live in ``pipelines/``."""

from __future__ import annotations

import argparse

from igpt.config import MODEL_SIZES, PAPER_PARAMS_M, ModelConfig


def sizes(resolution: int | None) -> str:
    rows = ["size   layers  d_model  heads  IR  params (M)  paper (M)  diff"]
    for name in MODEL_SIZES:
        cfg = ModelConfig.from_name(name, resolution=resolution)
        p = cfg.param_count() / 1e6
        paper = PAPER_PARAMS_M.get(name)
        ref = f"{paper:>9,}  {100 * (p - paper) / paper:+.2f}%" if paper else f"{'-':>9}"
        rows.append(f"{name:<6} {cfg.n_layer:>6}  {cfg.d_model:>7}  {cfg.n_head:>5}  {cfg.resolution:>2}  "
                    f"{p:>10,.1f}  {ref}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="igpt")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sizes", help="the named model sizes and their parameter counts against the paper")
    p.add_argument("--resolution", type=int, default=None, help="override each size's input resolution")
    args = parser.parse_args(argv)
    if args.cmd == "sizes":
        print(sizes(args.resolution))


if __name__ == "__main__":
    main()
