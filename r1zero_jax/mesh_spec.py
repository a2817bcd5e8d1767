"""Mesh specs ("data=4,tensor=2"): the one parser, without JAX, so the CLI and the config
checks can read one before JAX starts."""

from __future__ import annotations

import math

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """Sizes of every mesh axis (a missing axis is 1); the one -1 axis takes the remaining
    devices of `num_devices` (kept -1 when that is unknown). Errors name the spec."""
    sizes = {a: 1 for a in MESH_AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"mesh spec {spec!r}: expected AXIS=SIZE items, got {part!r}")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be positive or -1")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1")
    if num_devices is None:
        return sizes
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by "
                             f"the fixed axes' {fixed}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh spec {spec!r} needs {fixed} devices, but {num_devices} are "
                         "available")
    return sizes
