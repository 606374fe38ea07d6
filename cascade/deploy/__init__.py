"""Running tiers: one tier as a uvicorn process (:mod:`~cascade.deploy.process`) and the
local chain supervisor (:mod:`~cascade.deploy.supervisor`). Ray Serve will join here."""
