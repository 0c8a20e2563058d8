"""HTTP layer: thin routers that call the engine (see gptd_runtime.engine)."""
