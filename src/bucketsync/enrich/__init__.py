"""Enrichment and triggers: what follows an item's commit, never part of it.

The interface to the rest of the agent is small: ``Enricher`` and ``Triggers`` each run
as one task of the supervisor (``run(stop)``) or in burst mode (``drain()``); the ledger
queues their work through SQL triggers (MIGRATIONS v7); the API reads ``EnrichQueue`` and
``Deliveries``. See docs/enrichment.md.
"""

from bucketsync.enrich.queue import Enrichment, EnrichQueue
from bucketsync.enrich.triggers import Deliveries, Triggers
from bucketsync.enrich.worker import Enricher

__all__ = ["Deliveries", "EnrichQueue", "Enricher", "Enrichment", "Triggers"]
