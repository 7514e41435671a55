"""Shared by the benchmark scripts: one JSON line per figure, tagged with the device and the date."""

import datetime
import json
import platform

import jax


def emit(figure: str, value: float, unit: str, **details) -> None:
    """Prints one figure as a JSON line."""
    device = jax.devices()[0]
    print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, **details,
                      "device": f"{device.platform}:{device.device_kind}", "host": platform.processor() or platform.machine(),
                      "jax": jax.__version__, "date": datetime.date.today().isoformat()}), flush=True)
