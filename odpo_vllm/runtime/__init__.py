"""Who runs where: one builder per placement, the roles it returns, the resources it needs, the
engine pool, the weight publishers that move the learners' weights to the engines, the watchdog.
Above the roles (it builds them); below `run/` and the trainer."""
