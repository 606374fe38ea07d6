"""One tier: the :class:`~cascade.tier.node.Node` (local model + gate + upstream + queue), its
settings, idempotent serving, and the composition root that builds it from settings."""
