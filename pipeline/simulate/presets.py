"""Blood counts and white-cell differentials of the simulator's presets.

Counts are per microlitre of blood (haematology units); the scene turns them into cells per mm^2 of
smear. Differentials are relative weights over the nucleated classes of
:data:`pipeline.simulate.cells.MLL23_CLASSES` and are normalised on use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import ParameterError

#: Which part of a smear a simulated window shows: one zone, all zones compressed ('across'), or the
#: whole smear on a slide ('whole'). Here, not in scene.py, so the command line can list them cheaply.
PLACEMENTS = ("monolayer", "thick", "feathered", "across", "whole")

#: Artefacts of real slides and scans, each of which can be switched off (all are on by default).
ARTEFACTS: dict[str, str] = {
    "dust": "grey specks and thin fibres on the coverslip, out of focus",
    "precipitate": "clusters of dark azure stain granules under 1.5 um",
    "debris": "small pale fragments of lysed cells, 2-20 um^2 (far below a white cell)",
    "edge": "the coverslip edge, on whole slides",
    "label": "the opaque paper label, on whole slides (in a skipped area unless unscanned is off)",
    "unscanned": "bare glass the scanner skipped, black or white, on whole slides",
    "focus": "out-of-focus patches",
    "seams": "stitching seams, where vignetting, gain and tint change from camera field to field",
}


def parse_artefacts(text: str | Iterable[str]) -> frozenset[str]:
    """``"all"``, ``"none"`` or a comma-separated list of :data:`ARTEFACTS` names (or those names).

    Raises
    ------
    ParameterError
        For an unknown name; the message lists the valid ones.
    """
    parts = text.split(",") if isinstance(text, str) else text
    words = [w.strip() for w in parts if w.strip()]
    if words == ["all"]:
        return frozenset(ARTEFACTS)
    if words in (["none"], []):
        return frozenset()
    unknown = [w for w in words if w not in ARTEFACTS]
    if unknown:
        raise ParameterError(
            f"unknown artefact(s) {', '.join(unknown)}; use all, none or a list of: {', '.join(ARTEFACTS)}"
        )
    return frozenset(words)


#: Class frequencies of the MLL23 gallery (counts from the dataset paper).
MLL23_COUNTS: dict[str, float] = {
    "typical_lymphocyte": 5532,
    "plasma_cell": 1658,
    "large_granular_lymphocyte": 1849,
    "reactive_lymphocyte": 33,
    "hairy_cell": 3265,
    "neoplastic_lymphocyte": 180,
    "smudge_cell": 988,
    "band_neutrophil": 687,
    "segmented_neutrophil": 7170,
    "eosinophil": 2448,
    "basophil": 616,
    "monocyte": 2510,
    "myeloblast": 8606,
    "metamyelocyte": 483,
    "promyelocyte": 745,
    "myelocyte": 747,
    "atypical_promyelocyte": 2033,
    "normoblast": 2071,
}


@dataclass(frozen=True)
class BloodPreset:
    """Blood counts and a white-cell differential.

    Attributes
    ----------
    name
        Preset name used on the command line.
    description
        One line for ``--help`` and the truth sidecar.
    rbc_per_ul, wbc_per_ul, platelets_per_ul
        Red cells, nucleated (white) cells and platelets per microlitre of blood.
    differential
        Relative frequency of each nucleated class.
    """

    name: str
    description: str
    rbc_per_ul: float
    wbc_per_ul: float
    platelets_per_ul: float
    differential: dict[str, float] = field(default_factory=dict)

    def normalised_differential(self) -> dict[str, float]:
        """Return the differential as fractions that sum to one."""
        total = sum(self.differential.values())
        return {name: weight / total for name, weight in self.differential.items() if weight > 0}


_NORMAL_DIFF = {
    "segmented_neutrophil": 55.0,
    "band_neutrophil": 3.0,
    "typical_lymphocyte": 27.0,
    "large_granular_lymphocyte": 3.0,
    "monocyte": 6.0,
    "eosinophil": 3.0,
    "basophil": 1.0,
    "smudge_cell": 1.0,
    "reactive_lymphocyte": 1.0,
}

PRESETS: dict[str, BloodPreset] = {
    preset.name: preset
    for preset in (
        BloodPreset(
            "normal",
            "healthy adult: 5.0e6 red, 7.5e3 white, 2.5e5 platelets per uL, normal differential",
            5.0e6,
            7.5e3,
            2.5e5,
            _NORMAL_DIFF,
        ),
        BloodPreset(
            "mll23",
            "every MLL23 class at its frequency in the MLL23 gallery, leukaemic white count",
            4.0e6,
            3.0e4,
            1.5e5,
            MLL23_COUNTS,
        ),
        BloodPreset(
            "aml",
            "acute myeloid leukaemia: many myeloblasts, anaemia, low platelets",
            3.2e6,
            5.0e4,
            6.0e4,
            {
                "myeloblast": 62.0,
                "promyelocyte": 4.0,
                "myelocyte": 3.0,
                "metamyelocyte": 2.0,
                "band_neutrophil": 2.0,
                "segmented_neutrophil": 9.0,
                "typical_lymphocyte": 10.0,
                "monocyte": 3.0,
                "normoblast": 3.0,
                "smudge_cell": 2.0,
            },
        ),
        BloodPreset(
            "apl",
            "acute promyelocytic leukaemia: atypical promyelocytes with Auer rods, low platelets",
            3.0e6,
            2.0e4,
            3.0e4,
            {
                "atypical_promyelocyte": 60.0,
                "promyelocyte": 10.0,
                "myeloblast": 6.0,
                "myelocyte": 2.0,
                "segmented_neutrophil": 8.0,
                "typical_lymphocyte": 10.0,
                "monocyte": 2.0,
                "smudge_cell": 2.0,
            },
        ),
        BloodPreset(
            "cll",
            "chronic lymphocytic leukaemia: small mature lymphocytes and smudge cells",
            4.0e6,
            6.0e4,
            1.8e5,
            {
                "typical_lymphocyte": 70.0,
                "neoplastic_lymphocyte": 6.0,
                "smudge_cell": 12.0,
                "segmented_neutrophil": 8.0,
                "monocyte": 2.0,
                "large_granular_lymphocyte": 1.0,
                "eosinophil": 1.0,
            },
        ),
        BloodPreset(
            "hairy-cell",
            "hairy cell leukaemia: hairy cells, few monocytes, pancytopenia",
            3.5e6,
            4.0e3,
            9.0e4,
            {
                "hairy_cell": 45.0,
                "typical_lymphocyte": 28.0,
                "segmented_neutrophil": 22.0,
                "band_neutrophil": 1.0,
                "monocyte": 1.0,
                "eosinophil": 2.0,
                "plasma_cell": 1.0,
            },
        ),
    )
}


def get_preset(name: str) -> BloodPreset:
    """Look up a preset by name.

    Raises
    ------
    ParameterError
        If the name is unknown; the message lists the valid names.
    """
    try:
        return PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        raise ParameterError(f"unknown preset {name!r}; choose one of: {valid}") from None
