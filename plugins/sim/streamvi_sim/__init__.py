"""Still-shot serial crystallography simulator for streamvi.

``simulate_structure(config)`` builds a random atomic model and its true F(+)/F(−);
``simulate_images(config, truth)`` (or :class:`SimulatedSource`) turns it into indexed,
integrated still shots as :class:`streamvi.wire.CrystalMessage` -- image ``i`` depends only
on ``(seed, i)``.
"""
from streamvi_sim.beamtime import (PUMP_CODE_HEADER, ImageTruth, SimulatedSource, Simulator,
                                   detector_of, image_name, simulate_images)
from streamvi_sim.conditions import LightChange, condition_truths
from streamvi_sim.config import SimulationConfig
from streamvi_sim.geometry import Detector
from streamvi_sim.model import AtomModel
from streamvi_sim.truth import Truth, simulate_structure

__all__ = [
    "PUMP_CODE_HEADER", "AtomModel", "Detector", "ImageTruth", "LightChange", "condition_truths", "SimulatedSource", "SimulationConfig", "Simulator",
    "Truth", "detector_of", "image_name", "simulate_images", "simulate_structure",
]
