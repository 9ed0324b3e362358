"""The command worker: poll, decode, dispatch, store offsets, commit. No business rules."""
