"""The `segmentation` command line; the only package that wires consumers and producers together."""
