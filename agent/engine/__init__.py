"""The engine: a run's queues (:mod:`.run`), its asyncio side (:mod:`.driver`), and the one
admission queue per pool (:mod:`.admission`)."""
