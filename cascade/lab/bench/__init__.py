"""``cascade bench``: accuracy and latency of the running chain, measured side by side."""
