"""Input sources (PROTOCOL.md §4 StorageSpec), each a ``StorageProvider`` keyed by its
``StorageSource`` wire value."""
