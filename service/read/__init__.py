"""The read API (aiohttp, GET only) and its SQL views."""
