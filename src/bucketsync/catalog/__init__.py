"""The catalog: what users shape on top of the ledger without copying a binary.

``query`` is the filter language (pure: JSON in, parameterised SQL out) and the
expression indexes that make it fast; ``indexes`` applies those to a ledger.
"""
