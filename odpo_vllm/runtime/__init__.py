"""Who runs where: one builder per placement, the roles it returns, the engine pool, waits that
name the peer, the watchdog."""
