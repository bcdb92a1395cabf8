"""Regenerate the README figure: a simulated monolayer field beside the class legend.

Usage (from the repository root): ``python docs/make_figures.py``
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.simulate.legend import render_legend
from pipeline.simulate.presets import get_preset
from pipeline.simulate.render import SlideModel, render_region
from pipeline.simulate.scene import SceneSpec

OUT = Path(__file__).resolve().parent / "simulated_field.png"


def main() -> None:
    model = SlideModel(SceneSpec(40000, 40000, 0.25, 4, get_preset("mll23"), "monolayer"))
    field = render_region(model, 20000, 20000, 1200, 1200).rgb  # a 300 x 300 um monolayer field
    legend = render_legend(mpp=0.25, seed=2, columns=4)
    scale = field.shape[0] / legend.shape[0]
    legend = cv2.resize(legend, (round(legend.shape[1] * scale), field.shape[0]), interpolation=cv2.INTER_AREA)
    gap = np.full((field.shape[0], 16, 3), 255, np.uint8)
    picture = np.hstack([field, gap, legend])
    cv2.imwrite(str(OUT), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
