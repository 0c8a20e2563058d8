"""Test seam for real `serve` processes: with this directory on PYTHONPATH and GPTD_TEST_LOAD_GATE=PATH set,
loading the model waits until PATH exists, so a test can hold the server in its "loading" phase for as long
as it needs (a tiny model otherwise loads before the test can act). Nothing else changes."""

import os
import time

_gate = os.environ.get("GPTD_TEST_LOAD_GATE")
if _gate:
    import gptd_runtime.loading as _loading

    _real = _loading.load_model

    def _gated_load_model(*args, **kwargs):  # type: ignore[no-untyped-def]
        while not os.path.exists(_gate):
            time.sleep(0.05)
        return _real(*args, **kwargs)

    _loading.load_model = _gated_load_model
