"""Turn a parsed chunk's crystals into wire messages."""
from __future__ import annotations

from streamvi.wire import CrystalMessage
from streamvi_crystfel.chunk import ChunkRecord, CrystalRecord
from streamvi_crystfel.header import StreamHeader


def image_id(chunk: ChunkRecord) -> str:
    """``"<Image filename>//<Event>"``; the filename alone without an event.

    ``Event: //`` (CrystFEL ≥ 0.10 on single-frame files) names no event.
    """
    assert chunk.filename is not None
    if chunk.event is None or chunk.event.strip("/") == "":
        return chunk.filename
    return f"{chunk.filename}//{chunk.event}"


def photon_energy(chunk: ChunkRecord, header: StreamHeader | None) -> float | None:
    """Photon energy of an image, eV.

    The chunk's ``photon_energy_eV``; else the geometry's (or command line's) fixed energy;
    else the image header the geometry names (``photon_energy = /LCLS/photon_energy_eV``
    is found in the chunk as ``hdf5/LCLS/photon_energy_eV`` or
    ``header/float/LCLS/photon_energy_eV``).
    """
    if chunk.photon_energy_eV is not None:
        return chunk.photon_energy_eV
    if header is None:
        return None
    if header.photon_energy_eV is not None:
        return header.photon_energy_eV
    if header.photon_energy_key:
        suffix = "/" + header.photon_energy_key.strip("/")
        for key, value in chunk.headers.items():
            if key.endswith(suffix) and isinstance(value, (int, float)):
                return float(value)
    return None


def crystal_message(run: str, image: str, index: int, chunk: ChunkRecord,
                    crystal: CrystalRecord, energy_eV: float) -> CrystalMessage:
    """The wire message of one crystal (not yet validated).

    ``metadata`` carries the image serial number, indexer, beam divergence (rad), the
    crystal's lattice, ``predict_refine`` results (``final_residual``, ``det_shift_mm``),
    saturation counts, and every ``hdf5/…``/``header/…`` value of the image.
    """
    table = crystal.table
    assert table is not None and crystal.cell is not None
    metadata: dict[str, object] = {}
    if chunk.serial is not None:
        metadata["serial"] = chunk.serial
    if chunk.indexed_by is not None:
        metadata["indexed_by"] = chunk.indexed_by
    if chunk.beam_divergence is not None:
        metadata["beam_divergence_rad"] = chunk.beam_divergence
    for name in ("lattice_type", "centering", "unique_axis", "final_residual",
                 "num_saturated_reflections", "num_implausible_reflections"):
        value = getattr(crystal, name)
        if value is not None:
            metadata[name] = value
    if crystal.det_shift_mm is not None:
        metadata["det_shift_mm"] = list(crystal.det_shift_mm)
    metadata.update(chunk.headers)
    return CrystalMessage(
        run=run, image=image, crystal=index,
        h=table.h, k=table.k, l=table.l, I=table.I, sigI=table.sigI,
        photon_energy_eV=energy_eV, cell=crystal.cell,
        astar=crystal.astar, bstar=crystal.bstar, cstar=crystal.cstar,
        fs=table.fs, ss=table.ss, panel=table.panel,
        panel_names=table.panel_names if table.panel is not None else None,
        peak=table.peak, background=table.background,
        profile_radius=crystal.profile_radius, resolution_limit=crystal.resolution_limit,
        detector_distance_m=chunk.camera_length_m, beam_bandwidth=chunk.beam_bandwidth,
        metadata=metadata)
