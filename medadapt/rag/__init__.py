"""Retrieval-augmented generation: corpus → Haystack indexing pipeline → hybrid retrieval → prompts."""

import os

# Haystack sends usage telemetry by default; medadapt runs offline and on clusters: off unless asked for.
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
