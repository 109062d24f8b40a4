"""The controller's pure core: alpha policies and the clamp (no asyncio, NATS or torch)."""
