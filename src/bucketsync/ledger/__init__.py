"""The ledger: the catalog's durable state, its integrity under faults, and its retention."""
