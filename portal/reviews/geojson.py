"""GeoJSON in and out, the way QuPath writes it.

Coordinates are level-0 pixels (x right, y down), as in QuPath. A feature's
``properties.classification`` is ``{"name": str, "color": [r, g, b]}``; QuPath's older
``colorRGB`` (a packed signed ARGB int) is accepted on import.
"""

from __future__ import annotations

import math
from typing import Any

GEOMETRY_TYPES = ("Point", "LineString", "Polygon", "MultiPolygon")
MAX_VERTICES = 200_000  # per geometry; a freehand outline of a whole slide stays far below
MAX_COORDINATE = 10_000_000  # level-0 px; no scanner makes images this large


class GeometryError(ValueError):
    """A geometry or feature that cannot be stored; the message says what is wrong."""


def _check_position(pos: Any, bounds: tuple[int, int] | None, where: str) -> None:
    if not isinstance(pos, list | tuple) or len(pos) not in (2, 3):
        raise GeometryError(f"{where}: a position must be [x, y], got {pos!r:.60}")
    for value in pos:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GeometryError(f"{where}: coordinates must be numbers, got {value!r:.30}")
        if not math.isfinite(value) or abs(value) > MAX_COORDINATE:
            raise GeometryError(f"{where}: coordinate {value!r} is not a sane pixel position")
    x, y = pos[0], pos[1]
    if x < 0 or y < 0:
        raise GeometryError(f"{where}: position ({x}, {y}) is left of or above the slide")
    if bounds and (x > bounds[0] or y > bounds[1]):
        raise GeometryError(
            f"{where}: position ({x}, {y}) lies outside the slide ({bounds[0]} x {bounds[1]} "
            "level-0 px); coordinates must be level-0 pixels"
        )


def _check_positions(positions: Any, minimum: int, bounds, where: str) -> int:
    if not isinstance(positions, list) or len(positions) < minimum:
        raise GeometryError(f"{where}: needs a list of at least {minimum} positions")
    for i, pos in enumerate(positions):
        _check_position(pos, bounds, f"{where}[{i}]")
    return len(positions)


def _check_polygon(rings: Any, bounds, where: str) -> int:
    if not isinstance(rings, list) or not rings:
        raise GeometryError(f"{where}: a polygon needs at least one ring")
    count = 0
    for i, ring in enumerate(rings):
        count += _check_positions(ring, 4, bounds, f"{where}[{i}]")
        if list(ring[0]) != list(ring[-1]):
            raise GeometryError(f"{where}[{i}]: a polygon ring must end where it starts")
    return count


def validate_geometry(geometry: Any, bounds: tuple[int, int] | None = None) -> dict:
    """Check a GeoJSON geometry; ``bounds`` is the slide's level-0 (width, height) when known."""
    if not isinstance(geometry, dict):
        raise GeometryError("geometry must be a GeoJSON object")
    kind = geometry.get("type")
    if kind not in GEOMETRY_TYPES:
        raise GeometryError(f"geometry type {kind!r:.40} is not one of {', '.join(GEOMETRY_TYPES)}")
    coords = geometry.get("coordinates")
    if kind == "Point":
        _check_position(coords, bounds, "Point")
        count = 1
    elif kind == "LineString":
        count = _check_positions(coords, 2, bounds, "LineString")
    elif kind == "Polygon":
        count = _check_polygon(coords, bounds, "Polygon")
    else:
        if not isinstance(coords, list) or not coords:
            raise GeometryError("MultiPolygon: needs at least one polygon")
        count = sum(_check_polygon(p, bounds, f"MultiPolygon[{i}]") for i, p in enumerate(coords))
    if count > MAX_VERTICES:
        raise GeometryError(f"{kind}: {count} vertices is more than the {MAX_VERTICES} allowed")
    return {"type": kind, "coordinates": coords}


def _rgb_from_packed(packed: int) -> list[int]:
    packed &= 0xFFFFFF
    return [(packed >> 16) & 255, (packed >> 8) & 255, packed & 255]


def validate_color(color: Any) -> list[int] | None:
    if color is None:
        return None
    if (
        not isinstance(color, list)
        or len(color) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        raise GeometryError("classification color must be [r, g, b] with integers 0-255")
    return list(color)


def parse_classification(raw: Any) -> tuple[str, list[int] | None]:
    """``{"name", "color"}`` (or QuPath's ``colorRGB``) -> (name, [r, g, b] or None)."""
    if raw is None:
        return "", None
    if isinstance(raw, str):  # very old QuPath exports wrote the class name alone
        return _text(raw, "classification", 100), None
    if not isinstance(raw, dict):
        raise GeometryError("classification must be an object {name, color}")
    name = _text(raw.get("name", ""), "classification name", 100)
    if "color" in raw:
        return name, validate_color(raw["color"])
    packed = raw.get("colorRGB")
    if isinstance(packed, int) and not isinstance(packed, bool):
        return name, _rgb_from_packed(packed)
    return name, None


def _text(value: Any, what: str, max_length: int) -> str:
    if not isinstance(value, str) or len(value) > max_length or "\x00" in value:
        raise GeometryError(f"{what} must be a string of at most {max_length} characters")
    return value


def features_of(document: Any) -> list:
    """The features of a FeatureCollection, a single Feature, or a bare list of Features."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features")
        if not isinstance(features, list):
            raise GeometryError("FeatureCollection.features must be a list")
        return features
    if isinstance(document, dict) and document.get("type") == "Feature":
        return [document]
    raise GeometryError("expected a GeoJSON FeatureCollection, a Feature, or a list of Features")


def split_multipoints(features: list) -> list:
    """QuPath writes a points annotation as one ``MultiPoint`` feature: one Point each here."""
    out = []
    for feature in features:
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not (isinstance(geometry, dict) and geometry.get("type") == "MultiPoint"):
            out.append(feature)
            continue
        points = geometry.get("coordinates")
        if not isinstance(points, list) or not points:
            raise GeometryError("MultiPoint: needs a list of at least one position")
        if len(points) > MAX_VERTICES:
            raise GeometryError(f"MultiPoint: {len(points)} points is more than {MAX_VERTICES}")
        for point in points:
            out.append({**feature, "geometry": {"type": "Point", "coordinates": point}})
    return out


def parse_feature(feature: Any, bounds: tuple[int, int] | None) -> dict:
    """One feature -> the Annotation fields it carries (geometry, name, classification)."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise GeometryError('each item must be a GeoJSON Feature ({"type": "Feature", ...})')
    properties = feature.get("properties") or {}
    if not isinstance(properties, dict):
        raise GeometryError("Feature.properties must be an object")
    name, color = parse_classification(properties.get("classification"))
    label = _text(properties.get("name", ""), "Feature.properties.name", 200)
    return {
        "geometry": validate_geometry(feature.get("geometry"), bounds),
        "name": label,
        "classification_name": name,
        "classification_color": color,
    }


def feature_of(annotation) -> dict:
    """An Annotation as a QuPath-readable Feature."""
    properties: dict[str, Any] = {"objectType": "annotation"}
    if annotation.name:
        properties["name"] = annotation.name
    if annotation.classification_name:
        classification: dict[str, Any] = {"name": annotation.classification_name}
        if annotation.classification_color:
            classification["color"] = annotation.classification_color
        properties["classification"] = classification
    properties["lowmag"] = {
        "id": annotation.pk,
        "version": annotation.version,
        "author": annotation.author.get_username(),
    }
    return {"type": "Feature", "geometry": annotation.geometry, "properties": properties}


def feature_collection(annotations) -> dict:
    return {"type": "FeatureCollection", "features": [feature_of(a) for a in annotations]}


def source_frame(properties, width: int, height: int) -> dict | None:
    """The original scan's pixel frame recorded in a LowMag export's metadata (``aperio.Source*``
    as written by ``analysis.export``), with the factors from this slide's pixels to it."""
    size = str(properties.get("aperio.SourceSize", ""))
    try:
        source_w, source_h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        return None
    if source_w <= 0 or source_h <= 0 or width <= 0 or height <= 0:
        return None
    mpp = properties.get("aperio.SourceMPP")
    return {
        "frame": "source",
        "source": str(properties.get("aperio.Source", "")),
        "width": source_w,
        "height": source_h,
        "mpp": float(mpp) if mpp else None,
        "scale": [source_w / width, source_h / height],
    }


def scale_geometry(geometry: dict, sx: float, sy: float) -> dict:
    """``geometry`` with every position multiplied by (sx, sy), rounded to 1/100 px."""

    def scale(value):
        if value and isinstance(value[0], int | float):
            return [round(value[0] * sx, 2), round(value[1] * sy, 2), *value[2:]]
        return [scale(v) for v in value]

    return {"type": geometry["type"], "coordinates": scale(geometry["coordinates"])}
