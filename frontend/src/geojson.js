// GeoJSON (level-0 pixels, QuPath's frame) <-> Annotorious shapes (image pixels of the slide).

export const POINT_RADIUS_PX = 12; // how a Point is drawn: a small circle, in level-0 px

const boundsOf = (points) => {
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  return { minX: Math.min(...xs), minY: Math.min(...ys), maxX: Math.max(...xs), maxY: Math.max(...ys) };
};

const openRing = (ring) => {
  const points = ring.map((p) => [p[0], p[1]]);
  const [first, last] = [points[0], points[points.length - 1]];
  if (points.length > 1 && first[0] === last[0] && first[1] === last[1]) points.pop();
  return points;
};

const closedRing = (points) => {
  const ring = points.map((p) => [round(p[0]), round(p[1])]);
  ring.push([...ring[0]]);
  return ring;
};

const round = (v) => Math.round(v * 100) / 100;

function axisAlignedRectangle(points) {
  if (points.length !== 4) return null;
  const b = boundsOf(points);
  const onCorner = points.every(
    ([x, y]) => (x === b.minX || x === b.maxX) && (y === b.minY || y === b.maxY),
  );
  return onCorner && b.maxX > b.minX && b.maxY > b.minY ? b : null;
}

/** A GeoJSON geometry as an Annotorious selector. */
export function selectorFromGeometry(geometry) {
  const { type, coordinates } = geometry;
  if (type === 'Point') {
    const [cx, cy] = coordinates;
    const r = POINT_RADIUS_PX;
    return {
      type: 'ELLIPSE',
      geometry: { cx, cy, rx: r, ry: r, bounds: { minX: cx - r, minY: cy - r, maxX: cx + r, maxY: cy + r } },
    };
  }
  if (type === 'LineString') {
    const points = coordinates.map((p) => ({ type: 'CORNER', point: [p[0], p[1]] }));
    return { type: 'POLYLINE', geometry: { points, closed: false, bounds: boundsOf(coordinates) } };
  }
  if (type === 'Polygon' && coordinates.length === 1) {
    const points = openRing(coordinates[0]);
    const rect = axisAlignedRectangle(points);
    if (rect) {
      const { minX: x, minY: y } = rect;
      return { type: 'RECTANGLE', geometry: { x, y, w: rect.maxX - x, h: rect.maxY - y, bounds: rect } };
    }
    return { type: 'POLYGON', geometry: { points, bounds: boundsOf(points) } };
  }
  const polygons = (type === 'Polygon' ? [coordinates] : coordinates).map((rings) => {
    const converted = rings.map((ring) => ({ points: openRing(ring) }));
    return { rings: converted, bounds: boundsOf(converted[0].points) };
  });
  const all = polygons.flatMap((p) => [
    [p.bounds.minX, p.bounds.minY],
    [p.bounds.maxX, p.bounds.maxY],
  ]);
  return { type: 'MULTIPOLYGON', geometry: { polygons, bounds: boundsOf(all) } };
}

/** An Annotorious selector as a GeoJSON geometry, clamped to the slide. */
export function geometryFromSelector(selector, width, height) {
  const clamp = ([x, y]) => [Math.min(Math.max(x, 0), width), Math.min(Math.max(y, 0), height)];
  const g = selector.geometry;
  switch (selector.type) {
    case 'ELLIPSE':
      return { type: 'Point', coordinates: clamp([round(g.cx), round(g.cy)]) };
    case 'RECTANGLE':
      return {
        type: 'Polygon',
        coordinates: [
          closedRing(
            [
              [g.x, g.y],
              [g.x + g.w, g.y],
              [g.x + g.w, g.y + g.h],
              [g.x, g.y + g.h],
            ].map(clamp),
          ),
        ],
      };
    case 'POLYGON':
      return { type: 'Polygon', coordinates: [closedRing(g.points.map(clamp))] };
    case 'POLYLINE':
      return { type: 'LineString', coordinates: g.points.map((p) => clamp(p.point).map(round)) };
    case 'LINE':
      return { type: 'LineString', coordinates: g.points.map((p) => clamp(p).map(round)) };
    case 'MULTIPOLYGON':
      return {
        type: 'MultiPolygon',
        coordinates: g.polygons.map((poly) => poly.rings.map((ring) => closedRing(ring.points.map(clamp)))),
      };
    default:
      throw new Error(`cannot store a ${selector.type} shape`);
  }
}

/** Ramer-Douglas-Peucker simplification of an open polyline. */
export function simplify(points, tolerance) {
  if (points.length < 3) return points;
  const [a, b] = [points[0], points[points.length - 1]];
  const dx = b[0] - a[0];
  const dy = b[1] - a[1];
  const norm = Math.hypot(dx, dy) || 1;
  let worst = 0;
  let index = 0;
  for (let i = 1; i < points.length - 1; i++) {
    const d = Math.abs(dy * points[i][0] - dx * points[i][1] + b[0] * a[1] - b[1] * a[0]) / norm;
    if (d > worst) [worst, index] = [d, i];
  }
  if (worst <= tolerance) return [a, b];
  const left = simplify(points.slice(0, index + 1), tolerance);
  return left.slice(0, -1).concat(simplify(points.slice(index), tolerance));
}
