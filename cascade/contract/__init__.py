"""The wire contract and request-scoped types: API schemas, input decoding, deadlines,
escalation records. Imports nothing else of cascade but :mod:`cascade.errors`."""
