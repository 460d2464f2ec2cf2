#!/usr/bin/env python3
"""Draws the calibration statistics written by `moe-convert --calib TEXT --calib-json FILE`:
per layer and expert, selection frequency, router mass and output error when dropped (KL), as
heat maps.

  pip install matplotlib
  python3 scripts/analysis/plot_calib.py calib.json -o calib.png
"""
import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("-o", "--out", default="calib.png")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = json.load(open(args.json))
    L, E = s["n_layer"], s["n_expert"]
    panels = [("selection frequency (share of tokens)", "frequency"),
              ("mean router weight", "router_mass"),
              ("KL when dropped (nats, log10)", "drop_kl")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, E * 0.35), 2.2 * len(panels) + 0.5 * L / 6))
    for ax, (title, key) in zip(axes, panels):
        m = np.array(s[key], dtype=np.float64).reshape(L, E)
        if key == "drop_kl":
            m = np.log10(np.maximum(m, 1e-6))
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("layer")
        ax.set_xlabel("expert")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"calibration statistics over {s['tokens']} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
