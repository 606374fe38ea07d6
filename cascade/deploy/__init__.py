"""Running tiers: one tier as a uvicorn process (:mod:`~cascade.deploy.process`) and the
local chain supervisor (:mod:`~cascade.deploy.supervisor`), and one tier as a Ray Serve
application (:mod:`~cascade.deploy.ray_serve`, the only module that imports Ray)."""
