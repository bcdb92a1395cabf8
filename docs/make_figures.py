"""Regenerate the README figure: a real smear field beside a simulated monolayer field at the same scale
(0.25 um/px), and the simulator's class legend below.

The real field is image 100 of the Chula RBC-12 dataset (Naruenatthanaset et al. 2021, MIT licence; a
copy is in ../shared/data/chula-rbc), resampled from its estimated 0.18 um/px.

Usage (from the repository root): ``python docs/make_figures.py [--data ../shared/data]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from pipeline.simulate.legend import render_legend
from pipeline.simulate.presets import get_preset
from pipeline.simulate.render import SlideModel, render_region
from pipeline.simulate.scene import SceneSpec

OUT = Path(__file__).resolve().parent / "simulated_field.png"
MPP = 0.25
REAL_MPP = 0.18
FIELD_PX = (640, 480)  # 160 x 120 um
ZOOM = 2  # both fields shown at 0.125 um per screen pixel, so cells are large enough to judge


def _caption(image: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((28, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([image, bar])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    real_path = args.data / "chula-rbc" / "images" / "100.jpg"
    real = cv2.cvtColor(cv2.imread(str(real_path)), cv2.COLOR_BGR2RGB)
    scale = REAL_MPP / MPP
    real = cv2.resize(real, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = real.shape[:2]

    model = SlideModel(SceneSpec(40000, 40000, MPP, 4, get_preset("mll23"), "monolayer"))
    # A field around a white cell, as a reader would pick it.
    cells = model.scene.nucleated_in_rect(5000, 5000, 8000, 8000)
    cx, cy = int(cells.x_um[0] / MPP), int(cells.y_um[0] / MPP)
    sim = render_region(model, cx - w // 3, cy - h // 2, w, h).rgb

    zoom = cv2.INTER_NEAREST
    real = cv2.resize(real, None, fx=ZOOM, fy=ZOOM, interpolation=zoom)
    sim = cv2.resize(sim, None, fx=ZOOM, fy=ZOOM, interpolation=zoom)
    gap = np.full((real.shape[0] + 28, 16, 3), 255, np.uint8)
    top = np.hstack(
        [
            _caption(real, f"real (Chula RBC-12), {w * MPP:.0f} x {h * MPP:.0f} um"),
            gap,
            _caption(sim, "simulated monolayer, same scale"),
        ]
    )
    legend = render_legend(mpp=MPP, seed=2, columns=10)
    legend = cv2.resize(
        legend,
        (top.shape[1], round(legend.shape[0] * top.shape[1] / legend.shape[1])),
        interpolation=cv2.INTER_AREA,
    )
    picture = np.vstack([top, np.full((12, top.shape[1], 3), 255, np.uint8), legend])
    cv2.imwrite(str(OUT), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
